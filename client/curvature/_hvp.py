"""Hessian-vector products of a training loss, without disturbing training.

``HessianOperator`` is the one place that touches the user's model. Inside its ``with`` block
it offers ``matvec(V)``: for a ``[k, n]`` block of flat vectors (in the order of the model's
trainable ``named_parameters()``) it returns ``H V`` for the Hessian ``H`` of the loss with
respect to those parameters, at their current values.

Two ways to compute a product, both able to vmap over the ``k`` probes of a block:

* ``"func"``: forward-over-reverse, ``jvp(grad(loss))`` with ``torch.func``. Holds no graph
  between calls, but recomputes the forward and backward pass on each call.
* ``"autograd"``: reverse-over-reverse (double backward), the gradient graph built once per
  operator and reused by every product (``is_grads_batched`` for a block on an accelerator).
  It also serves models that ``torch.func`` cannot transform: custom autograd Functions
  without ``jvp``, in-place buffer updates inside forward, and, in torch 2.13, even
  ``nn.MSELoss`` ("ZeroTensors are immutable" under forward-over-reverse).

``"auto"`` takes the retained graph on a CPU: on the 1M-parameter benchmark MLP it measured
12 ms a product against 35 ms for forward-over-reverse (18 ms a probe in vmapped blocks of
8), and it skips torch.func's one-off warm-up of 1-2 s. On an accelerator, where a vmapped
block fills the device and the answer can differ, it times both on first use and keeps the
faster. Either way it falls back to the other backend if its pick raises.

What "never disturb training" means here, and how it is kept:

* parameters and ``.grad``: products are taken with respect to detached aliases of the
  parameters (``functional_call``), and only ``torch.autograd.grad``/``torch.func`` are used,
  so nothing accumulates into ``.grad``; the ``.grad`` attributes are restored by identity
  anyway, in case a user closure touched them.
* buffers: every buffer is passed as a copy, so an in-place update inside ``forward``
  lands on the copy. BatchNorm layers in training mode are switched to
  ``track_running_stats=False`` for the duration: they normalise with the statistics of the
  batch, exactly as the training step does (the curvature is that of the training loss), but
  neither read nor update the running statistics or ``num_batches_tracked``.
* RNG: the CPU generator and every initialised CUDA generator are saved and restored. Probes
  come from a private generator. Before each forward the global generators are seeded with a
  per-estimate seed, so a model with dropout sees one fixed mask per estimate and the
  products all belong to one and the same matrix.
* train/eval mode: never changed; the flags are restored anyway.
* the optimizer is never touched.
"""

from __future__ import annotations

import math
import time
from contextlib import contextmanager

import torch
from torch import nn

BACKENDS = ("auto", "func", "autograd")


class _LossModule(nn.Module):
    """The training loss as a module, so ``functional_call`` can swap the parameters of
    ``model`` also when the loss comes from a user closure that calls ``model`` itself."""

    def __init__(self, model, loss_fn, batch, closure):
        super().__init__()
        self.model = model
        self._loss_fn = loss_fn
        self._batch = batch
        self._closure = closure

    def forward(self):
        if self._closure is not None:
            return self._closure()
        inputs, targets = self._batch
        if isinstance(inputs, (tuple, list)):
            out = self.model(*inputs)
        elif isinstance(inputs, dict):
            out = self.model(**inputs)
        else:
            out = self.model(inputs)
        return self._loss_fn(out, targets)


def check_batch(batch):
    if not (isinstance(batch, (tuple, list)) and len(batch) == 2):
        raise ValueError(
            "batch must be a pair (inputs, targets) so the loss is loss_fn(model(inputs), targets); "
            "for anything else pass closure=lambda: <loss computed by calling the model>"
        )


@contextmanager
def preserved_training_state(model, params):
    """Leave RNG state, ``.grad``, BatchNorm statistics and train/eval flags as they were."""
    cpu_rng = torch.get_rng_state()
    cuda_rng = None
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        cuda_rng = torch.cuda.get_rng_state_all()
    modes = [(m, m.training) for m in model.modules()]
    grads = [(p, p.grad) for p in params]
    batchnorms = [
        m
        for m in model.modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training and m.track_running_stats
    ]
    for m in batchnorms:
        m.track_running_stats = False
    try:
        yield
    finally:
        for m in batchnorms:
            m.track_running_stats = True
        for m, training in modes:
            m.training = training
        for p, g in grads:
            if p.grad is not g:
                p.grad = g
        torch.set_rng_state(cpu_rng)
        if cuda_rng is not None:
            torch.cuda.set_rng_state_all(cuda_rng)


class _FuncProducts:
    """Forward-over-reverse products with ``torch.func``; recomputes the pass on each call."""

    name = "func"

    def __init__(self, loss_of, primals, reseed):
        from torch.func import grad, jvp, vmap

        argnums = tuple(range(len(primals)))
        gradient = grad(loss_of, argnums=argnums)

        def one(*tangents):
            return jvp(gradient, primals, tangents)[1]

        self._one = one
        self._block = vmap(one, randomness="same")
        self._reseed = reseed

    def __call__(self, tangents):
        self._reseed()
        if tangents[0].shape[0] == 1:
            return tuple(t.unsqueeze(0) for t in self._one(*(t[0] for t in tangents)))
        return self._block(*tangents)


class _AutogradProducts:
    """Double-backward products on a gradient graph built once and kept for reuse."""

    name = "autograd"

    def __init__(self, loss_of, primals, reseed):
        self._leaves = [p.detach().requires_grad_(True) for p in primals]
        reseed()
        with torch.enable_grad():
            loss = loss_of(*self._leaves)
            grads = torch.autograd.grad(loss, self._leaves, create_graph=True, allow_unused=True)
        # A gradient that does not depend on any parameter (or a parameter the loss does not
        # use) has a zero row in the Hessian.
        self._live = [i for i, g in enumerate(grads) if g is not None and g.requires_grad]
        self._grads = [grads[i] for i in self._live]
        # A vmapped block of products fills an accelerator; on a CPU it was slower per
        # product than a loop (26.7 vs 24.0 ms on the 1M-parameter benchmark MLP, 1 thread).
        self._batched = self._leaves[0].device.type != "cpu"

    def __call__(self, tangents):
        k = tangents[0].shape[0]
        if not self._grads:
            return tuple(torch.zeros_like(t) for t in tangents)
        cotangents = [tangents[i] for i in self._live]
        if k == 1:
            hv = self._grad([c[0] for c in cotangents], batched=False)
            return tuple(torch.zeros_like(t) if h is None else h.unsqueeze(0) for t, h in zip(tangents, hv))
        outs = [torch.zeros_like(t) for t in tangents]
        if self._batched:
            try:
                hv = self._grad(cotangents, batched=True)
            except torch.cuda.OutOfMemoryError:
                raise
            except RuntimeError:
                # An op without a batching rule: one product at a time from now on.
                self._batched = False
            else:
                return tuple(o if h is None else h for o, h in zip(outs, hv))
        for j in range(k):
            hv = self._grad([c[j] for c in cotangents], batched=False)
            for out, h in zip(outs, hv):
                if h is not None:
                    out[j].copy_(h)
        return tuple(outs)

    def _grad(self, cotangents, batched):
        with torch.enable_grad():
            return torch.autograd.grad(
                self._grads,
                self._leaves,
                grad_outputs=cotangents,
                retain_graph=True,
                allow_unused=True,
                is_grads_batched=batched,
            )


class HessianOperator:
    """The Hessian of a training loss at the current parameters, as products with blocks of
    flat vectors. Use as a context manager; ``matvec`` only inside the ``with`` block.

        with HessianOperator(model, loss_fn, (x, y)) as op:
            hv = op.matvec(v[None])[0]
    """

    def __init__(self, model, loss_fn=None, batch=None, *, closure=None, backend="auto", seed=0, max_block=16):
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, not {backend!r}")
        if (batch is None) == (closure is None):
            raise ValueError("pass exactly one of batch=(inputs, targets) or closure=<callable returning the loss>")
        if batch is not None:
            check_batch(batch)
            if not callable(loss_fn):
                raise ValueError("loss_fn must be callable as loss_fn(model(inputs), targets)")
        if closure is not None and not callable(closure):
            raise ValueError("closure must be a callable that returns the scalar training loss")
        self.model = model
        self.backend = backend
        self.seed = int(seed)
        self.max_block = max(1, int(max_block))
        self.hvps = 0
        self.seconds_by_backend: dict[str, float] = {}
        self._module = _LossModule(model, loss_fn, batch, closure)
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        if not named:
            raise ValueError("the model has no parameter with requires_grad=True")
        self._names = ["model." + n for n, _ in named]
        self._params = [p for _, p in named]
        self.shapes = [p.shape for p in self._params]
        self.sizes = [p.numel() for p in self._params]
        self.n = sum(self.sizes)
        self.device = self._params[0].device
        dtype = self._params[0].dtype
        self.dtype = dtype if dtype in (torch.float32, torch.float64) else torch.float32
        self._products = None
        self._fell_back = False
        self._guard = None

    # -- the with block ---------------------------------------------------------------
    def __enter__(self):
        self._guard = preserved_training_state(self.model, self._params)
        self._guard.__enter__()
        try:
            buffers = {"model." + n: b.clone() for n, b in self.model.named_buffers()}
            primals = tuple(p.detach() for p in self._params)
            names = self._names
            module = self._module

            def loss_of(*params):
                from torch.func import functional_call

                loss = functional_call(module, (dict(zip(names, params)), buffers), ())
                if not (isinstance(loss, torch.Tensor) and loss.numel() == 1):
                    raise ValueError(
                        f"the loss must be a scalar tensor, got {type(loss).__name__} "
                        f"of shape {getattr(loss, 'shape', None)}"
                    )
                return loss.reshape(())

            self._loss_of, self._primals = loss_of, primals
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc):
        self._products = None
        self._loss_of = self._primals = None
        guard, self._guard = self._guard, None
        if guard is not None:
            guard.__exit__(*exc)
        return False

    def _reseed(self):
        torch.default_generator.manual_seed(self.seed)
        if self.device.type == "cuda":
            with torch.cuda.device(self.device):
                torch.cuda.manual_seed(self.seed)

    def _make(self, name):
        cls = _FuncProducts if name == "func" else _AutogradProducts
        return cls(self._loss_of, self._primals, self._reseed)

    # -- products ---------------------------------------------------------------------
    def matvec(self, V):
        """``H @ v`` for each row ``v`` of the ``[k, n]`` tensor ``V`` (a ``[k, n]`` result)."""
        if self._guard is None:
            raise RuntimeError("HessianOperator.matvec is only usable inside its with block")
        if V.dim() != 2 or V.shape[1] != self.n:
            raise ValueError(f"expected a [k, {self.n}] block of vectors, got {tuple(V.shape)}")
        outs = []
        start = 0
        while start < V.shape[0]:
            block = V[start : start + self.max_block]
            try:
                outs.append(self._apply(block))
            except torch.cuda.OutOfMemoryError:
                if self.max_block == 1:
                    raise
                self.max_block = max(1, self.max_block // 2)
                continue
            start += block.shape[0]
        self.hvps += V.shape[0]
        return torch.cat(outs) if len(outs) > 1 else outs[0]

    def _apply(self, V):
        tangents = self._split(V)
        if self._products is None:
            self._products = self._choose(tangents)
            return self._last
        try:
            out = self._products(tangents)
        except (ValueError, torch.cuda.OutOfMemoryError):
            raise
        except Exception:
            if self.backend != "auto" or self._fell_back:
                raise
            self._fell_back = True
            other = "func" if self._products.name == "autograd" else "autograd"
            self._products = self._make(other)
            out = self._products(tangents)
        return self._join(out, V.shape[0])

    def _choose(self, tangents):
        """Build the products. ``"auto"``: on a CPU the retained graph (``"autograd"``) is
        taken at once (see the module docstring for the measurements); on an accelerator
        each is warmed up and timed twice and the faster kept. A backend that raises is
        skipped."""
        k = tangents[0].shape[0]
        if self.backend != "auto":
            names = [self.backend]
        elif self.device.type == "cpu":
            names = ["autograd", "func"]
        else:
            names = ["func", "autograd"]
        timed = self.backend == "auto" and self.device.type != "cpu"
        best, best_time, last_error = None, None, None
        for name in names:
            try:
                products = self._make(name)
                out = products(tangents)
                elapsed = 0.0
                if timed:
                    elapsed = math.inf
                    for _ in range(2):
                        torch.cuda.synchronize(self.device)
                        t0 = time.perf_counter()
                        out = products(tangents)
                        torch.cuda.synchronize(self.device)
                        elapsed = min(elapsed, time.perf_counter() - t0)
            except ValueError:
                raise
            except Exception as exc:  # this backend cannot handle the model
                last_error = exc
                continue
            self.seconds_by_backend[name] = elapsed
            if best is None or elapsed < best_time:
                best, best_time, self._last = products, elapsed, self._join(out, k)
            if not timed:
                break
        if best is None:
            raise last_error
        return best

    def _split(self, V):
        parts = V.split(self.sizes, dim=1)
        return tuple(
            part.reshape(V.shape[0], *shape).to(p.dtype) for part, shape, p in zip(parts, self.shapes, self._params)
        )

    def _join(self, parts, k):
        return torch.cat([h.reshape(k, -1).to(self.dtype) for h in parts], dim=1)
