"""Routes: webhooks per project, test-send, and each webhook's delivery log."""

from __future__ import annotations

import secrets
from typing import Annotated

from fastapi import APIRouter, HTTPException, Query, Request, Response

from ..alerting.webhook_targets import creation_error
from ..parsing import WEBHOOK_ID_MAX, id_path
from .alert_schemas import DeliveryOut, DeliveryStatus, WebhookCreate, WebhookCreated, WebhookOut, WebhookUpdate
from .alerts import ProjectName
from .deps import SettingsDep, StoreDep, StrictJSONRoute

router = APIRouter(tags=["webhooks"], route_class=StrictJSONRoute)

WebhookId = id_path(WEBHOOK_ID_MAX, "the webhook's id")

#: Bytes of randomness in a generated secret (256 bits, the HMAC-SHA256 key size).
SECRET_BYTES = 32


@router.get(
    "/projects/{project}/webhooks", response_model=list[WebhookOut], responses={404: {"description": "no such project"}}
)
def list_webhooks(project: ProjectName, store: StoreDep):
    """The project's webhooks. Secrets are never shown again after creation."""
    return store.webhooks.list(project)


@router.post(
    "/projects/{project}/webhooks",
    response_model=WebhookCreated,
    status_code=201,
    responses={
        422: {"description": "a bad body, or a url that is or resolves to a loopback, private or reserved address"}
    },
)
def create_webhook(project: ProjectName, body: WebhookCreate, store: StoreDep, settings: SettingsDep):
    """Add a webhook (creating the project if needed). The reply holds the secret: the only time it is shown.

    The url's host must not be, or resolve to, a loopback, link-local, private, carrier-grade
    NAT, multicast or reserved address unless ``STETHOSCOPE_WEBHOOK_ALLOW_PRIVATE`` is set; a
    name that does not resolve yet is accepted. Every delivery checks the target again."""
    refused = creation_error(body.url, settings.webhook_allow_private)
    if refused is not None:
        raise HTTPException(422, detail=refused)
    secret = body.secret or secrets.token_hex(SECRET_BYTES)
    return store.webhooks.create(project, body.url, secret, list(body.severities), body.format, body.enabled)


@router.delete("/webhooks/{webhook_id}", status_code=204, responses={404: {"description": "no such webhook"}})
def delete_webhook(webhook_id: WebhookId, store: StoreDep):
    """Remove a webhook and its delivery log (pending deliveries are dropped)."""
    store.webhooks.delete(webhook_id)
    return Response(status_code=204)


@router.patch("/webhooks/{webhook_id}", response_model=WebhookOut, responses={404: {"description": "no such webhook"}})
def update_webhook(webhook_id: WebhookId, body: WebhookUpdate, store: StoreDep):
    """Disable (or enable again) a webhook; a disabled one keeps its secret and delivery log."""
    return store.webhooks.set_enabled(webhook_id, body.enabled)


@router.post(
    "/webhooks/{webhook_id}/test", response_model=DeliveryOut, responses={404: {"description": "no such webhook"}}
)
def test_webhook(webhook_id: WebhookId, request: Request, settings: SettingsDep):
    """Send a sample alert now (once, no retries) and return the delivery with its outcome."""
    outbox = getattr(request.app.state, "outbox", None)
    if outbox is None:
        raise HTTPException(503, detail="the webhook outbox is not running")
    return outbox.send_test(webhook_id, settings.base_url)


@router.get(
    "/webhooks/{webhook_id}/deliveries",
    response_model=list[DeliveryOut],
    responses={404: {"description": "no such webhook"}},
)
def list_deliveries(
    webhook_id: WebhookId,
    store: StoreDep,
    status: DeliveryStatus | None = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
):
    """The webhook's delivery log, newest first: attempts, last status code or error, when delivered."""
    return store.webhooks.deliveries(webhook_id, status, limit)
