"""Training-health detectors: pure Python, incremental, with their state in a plain dict.

The same code runs inside the server on ingest and inside a training job offline::

    from stethoscope.core.detectors import DetectorSet
    detectors = DetectorSet({"loss_spike": {"threshold": 8.0}})
    state = {}                                   # keep it between calls; it is JSON-safe
    changes = detectors.update(state, [("loss", 10, 2.31), ("grad/norm", 10, 0.8)])
    for c in changes:                            # AlertChange: open / update / resolve
        print(c.detector, c.key, c.severity, c.status, c.message)

Standard library only: no torch, no numpy.
"""

from ._base import OPEN, RESOLVE, SEVERITIES, UPDATE, AlertChange, Detector, severity_rank
from ._engine import CAUSES, DETECTORS, DetectorSet
from .dead_units import DeadUnitsDetector, DeadUnitsParams
from .divergence import DivergenceDetector, DivergenceParams
from .edge_of_stability import EdgeOfStabilityDetector, EdgeOfStabilityParams
from .layer_gradients import LayerGradientsDetector, LayerGradientsParams
from .loss_spike import LossSpikeDetector, LossSpikeParams
from .oscillation import OscillationDetector, OscillationParams
from .overfitting import OverfittingDetector, OverfittingParams
from .plateau import PlateauDetector, PlateauParams
from .rank_drift import RankDriftDetector, RankDriftParams
from .slow_steps import SlowStepsDetector, SlowStepsParams
from .softmax_collapse import SC_MARGIN_NATS, SoftmaxCollapseDetector, SoftmaxCollapseParams
from .stability_gap import StabilityGapDetector, StabilityGapParams
from .stalled import StalledRunDetector, StalledRunParams

__all__ = [
    "AlertChange",
    "CAUSES",
    "DETECTORS",
    "Detector",
    "DeadUnitsDetector",
    "DeadUnitsParams",
    "DetectorSet",
    "DivergenceDetector",
    "DivergenceParams",
    "EdgeOfStabilityDetector",
    "EdgeOfStabilityParams",
    "LayerGradientsDetector",
    "LayerGradientsParams",
    "LossSpikeDetector",
    "LossSpikeParams",
    "OPEN",
    "OscillationDetector",
    "OscillationParams",
    "OverfittingDetector",
    "OverfittingParams",
    "PlateauDetector",
    "PlateauParams",
    "RESOLVE",
    "RankDriftDetector",
    "RankDriftParams",
    "SC_MARGIN_NATS",
    "SEVERITIES",
    "SlowStepsDetector",
    "SlowStepsParams",
    "SoftmaxCollapseDetector",
    "SoftmaxCollapseParams",
    "StabilityGapDetector",
    "StabilityGapParams",
    "StalledRunDetector",
    "StalledRunParams",
    "UPDATE",
    "severity_rank",
]
