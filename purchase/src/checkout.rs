//! Checkout: `POST /api/v1/events/{id}/checkout` with an `Idempotency-Key`. The key is claimed
//! first (one row per pass and key): the same key and body replay the stored answer, another
//! body is refused (422), and a retry while the first attempt runs gets 409. The card is charged
//! with no row lock held; then one transaction locks the hold's seats, checks the hold still
//! owns them, marks them sold, records the order (redeeming the pass's `jti`: one order per
//! buyer) and the stored answer. If the seats were lost meanwhile, the charge is refunded.

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use chrono::{DateTime, Utc};
use fred::prelude::*;
use serde::{Deserialize, Serialize};
use sha2::Digest;
use shared::error::violated_constraint;
use shared::extract::{Json, Path};
use shared::ids::{EventId, TicketId};
use shared::ApiError;
use tracing::instrument;
use uuid::Uuid;

use crate::passgate::Pass;
use crate::payments::ChargeOutcome;
use crate::seats::lock_seats;
use crate::AppState;

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/api/v1/events/{id}/checkout", post(checkout))
        .route("/api/v1/events/{id}/orders/{order_id}", get(order))
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct CheckoutRequest {
    pub hold_id: Uuid,
    /// A card token from the payment provider (sandbox: `tok_visa`, `tok_chargeDeclined`, …).
    pub payment_token: String,
}

#[derive(Debug, Serialize, Deserialize, Clone)]
pub struct TicketView {
    pub code: String,
    pub seat_id: i64,
}

#[derive(Debug, Serialize, Deserialize, Clone)]
pub struct OrderView {
    pub order_id: Uuid,
    pub event_id: i64,
    pub hold_id: Uuid,
    pub status: String,
    pub total_cents: i64,
    pub payment_ref: String,
    pub tickets: Vec<TicketView>,
    pub created_at: DateTime<Utc>,
}

/// Who a checkout acts for: taken from the pass at checkout, or from the payment record when
/// reconciliation finishes a checkout interrupted by a crash.
#[derive(Clone, Debug)]
pub(crate) struct Buyer {
    pub event: EventId,
    pub jti: Uuid,
    pub ticket: TicketId,
    pub identity: String,
}

impl From<&Pass> for Buyer {
    fn from(pass: &Pass) -> Self {
        Buyer {
            event: pass.event,
            jti: pass.claims.jti,
            ticket: pass.claims.tkt,
            identity: pass.claims.sub.clone(),
        }
    }
}

/// The answer a finished checkout attempt gives to every retry with its key.
pub(crate) struct Final {
    status: StatusCode,
    body: serde_json::Value,
}

impl Final {
    fn error(e: &ApiError) -> Self {
        Final {
            status: e.status(),
            body: serde_json::json!({ "error": e.code(), "message": e.to_string() }),
        }
    }
}

fn idempotency_key(headers: &HeaderMap) -> Result<String, ApiError> {
    let raw = headers.get("idempotency-key").ok_or_else(|| {
        ApiError::BadRequest(
            "idempotency_key_missing",
            "checkout needs an Idempotency-Key header".into(),
        )
    })?;
    let key = raw.to_str().unwrap_or_default();
    let ok = (1..=200).contains(&key.len()) && key.bytes().all(|b| b.is_ascii_graphic());
    if !ok {
        return Err(ApiError::BadRequest(
            "idempotency_key_invalid",
            "Idempotency-Key must be 1 to 200 visible ASCII characters".into(),
        ));
    }
    Ok(key.to_owned())
}

#[instrument(skip_all, fields(event = %pass.event, jti = %pass.claims.jti))]
async fn checkout(
    State(state): State<AppState>,
    pass: Pass,
    headers: HeaderMap,
    Json(request): Json<CheckoutRequest>,
) -> Result<Response, ApiError> {
    let key = idempotency_key(&headers)?;
    let buyer = Buyer::from(&pass);
    if !state.payments.accepts(&request.payment_token) {
        return Err(ApiError::Unprocessable(
            "invalid_field",
            "payment_token: not a card token this payment provider issued".into(),
        ));
    }
    let hash =
        sha2::Sha256::digest(serde_json::to_vec(&request).map_err(ApiError::internal)?).to_vec();

    // A retry of a known key is answered from what the first attempt stored.
    if let Some(response) = replay(&state, &buyer, &key, &hash).await? {
        return Ok(response);
    }
    match run(&state, &buyer, &key, &hash, &request).await? {
        Some(done) => Ok(answer(&state, done.status, done.body)),
        // Another request with this key claimed it first.
        None => replay(&state, &buyer, &key, &hash)
            .await?
            .ok_or_else(|| ApiError::internal("a claimed checkout key vanished")),
    }
}

/// A checkout's answer as the client gets it: a completed order also carries the fan's
/// `manage_token` (to view or refund the order after the pass expires). The token is derived
/// from the order id, never stored, so stored answers (for retries) do not hold it.
fn answer(state: &AppState, status: StatusCode, mut body: serde_json::Value) -> Response {
    if status == StatusCode::CREATED {
        let order = body
            .get("order_id")
            .and_then(|v| v.as_str())
            .and_then(|v| Uuid::parse_str(v).ok());
        if let (Some(order), Some(fields)) = (order, body.as_object_mut()) {
            fields.insert(
                "manage_token".into(),
                state.orders.manage_token(order).into(),
            );
        }
    }
    (status, axum::Json(body)).into_response()
}

/// A checkout key's row: request hash, state, and the stored answer once done.
type StoredCheckout = (Vec<u8>, String, Option<i32>, Option<serde_json::Value>);

/// The answer to a key already used: its stored answer, 409 while it runs, 422 with another
/// body; `None` for a key not used yet.
async fn replay(
    state: &AppState,
    buyer: &Buyer,
    key: &str,
    hash: &[u8],
) -> Result<Option<Response>, ApiError> {
    let stored: Option<StoredCheckout> = sqlx::query_as(
        "SELECT request_hash, state, status_code, response FROM checkout_requests
             WHERE jti = $1 AND idempotency_key = $2",
    )
    .bind(buyer.jti)
    .bind(key)
    .fetch_optional(&state.pg)
    .await?;
    let Some((stored_hash, run_state, status, body)) = stored else {
        return Ok(None);
    };
    if stored_hash != hash {
        return Err(ApiError::Unprocessable(
            "idempotency_key_reused",
            "this Idempotency-Key was used with a different request body".into(),
        ));
    }
    match (run_state.as_str(), status, body) {
        ("done", Some(status), Some(body)) => {
            let status = StatusCode::from_u16(status as u16).map_err(ApiError::internal)?;
            Ok(Some(answer(state, status, body)))
        }
        _ => Err(ApiError::Conflict(
            "checkout_in_progress",
            "a checkout with this Idempotency-Key is still running; retry shortly".into(),
        )),
    }
}

#[derive(sqlx::FromRow)]
pub(crate) struct HoldRow {
    pub jti: Uuid,
    pub seat_ids: Vec<i64>,
}

/// Runs a claimed checkout. `Err` means nothing happened (the key is freed); `Ok` is the final
/// answer, already stored for retries when it follows a charge attempt.
async fn run(
    state: &AppState,
    buyer: &Buyer,
    key: &str,
    hash: &[u8],
    request: &CheckoutRequest,
) -> Result<Option<Final>, ApiError> {
    let (hold, used): (Option<HoldRow>, bool) = {
        let row: Option<(Uuid, Vec<i64>, bool)> = sqlx::query_as(
            "SELECT h.jti, h.seat_ids, EXISTS (SELECT 1 FROM orders o WHERE o.jti = h.jti)
             FROM holds h WHERE h.id = $1 AND h.event_id = $2",
        )
        .bind(request.hold_id)
        .bind(buyer.event.get())
        .fetch_optional(&state.pg)
        .await?;
        match row {
            Some((jti, seat_ids, used)) => (Some(HoldRow { jti, seat_ids }), used),
            None => (None, false),
        }
    };
    let hold = hold
        .filter(|h| h.jti == buyer.jti)
        .ok_or_else(|| ApiError::NotFound("hold_not_found", "this pass has no such hold".into()))?;
    if used {
        return Err(ApiError::Conflict(
            "pass_used",
            "this pass has already been used for a purchase".into(),
        ));
    }
    let Some((payment_key, total)) = begin_payment(state, buyer, key, hash, request, &hold).await?
    else {
        return Ok(None);
    };
    let result = charge_and_commit(state, buyer, key, request, &hold, &payment_key, total).await;
    // Whatever did not end in a purchase gives the hold back (it still expires on time).
    let settled = matches!(&result, Ok(done) if done.status == StatusCode::CREATED);
    if !settled {
        sqlx::query("UPDATE holds SET status = 'active' WHERE id = $1 AND status = 'paying'")
            .bind(request.hold_id)
            .execute(&state.pg)
            .await?;
    }
    if result.is_err() {
        // Nothing was charged or sold: free the key so a retry runs again.
        sqlx::query("DELETE FROM checkout_requests WHERE jti = $1 AND idempotency_key = $2")
            .bind(buyer.jti)
            .bind(key)
            .execute(&state.pg)
            .await?;
    }
    result.map(Some)
}

/// Marks the hold as being paid for, so a second checkout of the same hold (another key, a
/// second tab) is refused before it can charge the card again.
async fn claim_hold(tx: &mut sqlx::PgConnection, hold_id: Uuid) -> Result<(), ApiError> {
    let claimed = sqlx::query(
        "UPDATE holds SET status = 'paying'
         WHERE id = $1 AND status = 'active' AND expires_at > now()",
    )
    .bind(hold_id)
    .execute(&mut *tx)
    .await?
    .rows_affected()
        == 1;
    if claimed {
        return Ok(());
    }
    let status: String = sqlx::query_scalar("SELECT status FROM holds WHERE id = $1")
        .bind(hold_id)
        .fetch_one(&mut *tx)
        .await?;
    Err(match status.as_str() {
        "paying" => ApiError::Conflict(
            "checkout_in_progress",
            "this hold is already being paid for".into(),
        ),
        "active" => ApiError::Conflict(
            "hold_expired",
            "this hold has expired; hold the seats again".into(),
        ),
        other => ApiError::Conflict("hold_not_active", format!("this hold was {other}")),
    })
}

/// One transaction claims the idempotency key and the hold for this checkout and records the
/// payment about to be taken (the record reconciliation starts from): nothing is charged
/// unless all three stand. Returns the payment's idempotency key and amount, or `None` when
/// another request with the same key claimed it first (a concurrent claim waits on the key's
/// unique index until that one commits).
async fn begin_payment(
    state: &AppState,
    buyer: &Buyer,
    key: &str,
    hash: &[u8],
    request: &CheckoutRequest,
    hold: &HoldRow,
) -> Result<Option<(String, i64)>, ApiError> {
    let mut tx = state.pg.begin().await?;
    let claimed = sqlx::query(
        "INSERT INTO checkout_requests (jti, idempotency_key, request_hash, state)
         VALUES ($1, $2, $3, 'running') ON CONFLICT DO NOTHING",
    )
    .bind(buyer.jti)
    .bind(key)
    .bind(hash)
    .execute(&mut *tx)
    .await?
    .rows_affected()
        == 1;
    if !claimed {
        return Ok(None);
    }
    claim_hold(&mut tx, request.hold_id).await?;
    let total: i64 = sqlx::query_scalar(
        "SELECT COALESCE(sum(price_cents), 0)::bigint FROM seats WHERE id = ANY($1)",
    )
    .bind(&hold.seat_ids)
    .fetch_one(&mut *tx)
    .await?;
    let payment_key = format!("{}:{key}", buyer.jti);
    sqlx::query(
        "INSERT INTO payments (idempotency_key, provider, amount_cents, status, event_id, jti,
                               identity, ticket_id, hold_id, checkout_key)
         VALUES ($1, $2, $3, 'pending', $4, $5, $6, $7, $8, $9) ON CONFLICT DO NOTHING",
    )
    .bind(&payment_key)
    .bind(state.payments.name())
    .bind(total)
    .bind(buyer.event.get())
    .bind(buyer.jti)
    .bind(&buyer.identity)
    .bind(buyer.ticket.0)
    .bind(request.hold_id)
    .bind(key)
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(Some((payment_key, total)))
}

#[allow(clippy::too_many_arguments)]
async fn charge_and_commit(
    state: &AppState,
    buyer: &Buyer,
    key: &str,
    request: &CheckoutRequest,
    hold: &HoldRow,
    payment_key: &str,
    total: i64,
) -> Result<Final, ApiError> {
    // No row lock is held here: the provider may take seconds.
    let outcome = state
        .payments
        .charge(payment_key, total, &request.payment_token)
        .await
        .map_err(|e| {
            tracing::warn!(error = %e, "payment provider call failed");
            ApiError::Unavailable(
                "payment_unavailable",
                "the payment provider did not answer; retry with the same Idempotency-Key".into(),
            )
        })?;
    if state.config.fault_crash_after_charge && matches!(outcome, ChargeOutcome::Succeeded { .. }) {
        // Fault injection for the reconciliation test: die between the charge and the order.
        sqlx::query("UPDATE payments SET status = 'succeeded' WHERE idempotency_key = $1")
            .bind(payment_key)
            .execute(&state.pg)
            .await?;
        tracing::error!("FAIRGATE_FAULT_CRASH_AFTER_CHARGE: aborting after the charge");
        std::process::abort();
    }
    settle(
        state,
        buyer,
        key,
        request.hold_id,
        hold,
        total,
        payment_key,
        outcome,
    )
    .await
}

/// Records how a payment ended (`declined`, `refunded`, `abandoned`): it needs no more care.
pub(crate) async fn mark_settled(
    pg: &sqlx::PgPool,
    payment_key: &str,
    status: &str,
) -> Result<(), ApiError> {
    sqlx::query("UPDATE payments SET status = $2, settled_at = now() WHERE idempotency_key = $1")
        .bind(payment_key)
        .bind(status)
        .execute(pg)
        .await?;
    Ok(())
}

/// Finishes a checkout once the provider has answered: a decline is recorded and answered 402;
/// a charge becomes an order, or is refunded if the seats or the pass were lost meanwhile. Used
/// by checkout and by reconciliation after a crash, so both decide the same way.
#[allow(clippy::too_many_arguments)]
pub(crate) async fn settle(
    state: &AppState,
    buyer: &Buyer,
    key: &str,
    hold_id: Uuid,
    hold: &HoldRow,
    total: i64,
    payment_key: &str,
    outcome: ChargeOutcome,
) -> Result<Final, ApiError> {
    let reference = match outcome {
        ChargeOutcome::Declined { code, message } => {
            mark_settled(&state.pg, payment_key, "declined").await?;
            let done = Final::error(&ApiError::PaymentRequired(
                code,
                format!("{message}; your seats stay held until the hold expires"),
            ));
            store(&state.pg, buyer, key, &done).await?;
            return Ok(done);
        }
        ChargeOutcome::Succeeded { reference } => reference,
    };
    match commit(
        state,
        buyer,
        key,
        hold_id,
        hold,
        total,
        payment_key,
        &reference,
    )
    .await
    {
        Ok((done, sold_out)) => {
            if sold_out {
                close_line(state, buyer).await;
            }
            crate::live::seats_changed(state, buyer.event, &hold.seat_ids, "sold").await;
            finish_shopper(state, buyer).await;
            metrics::counter!("purchase_orders_total").increment(1);
            Ok(done)
        }
        Err(refused) if refused.status().is_client_error() => {
            // The seats or the pass were lost between charge and commit: give the money back.
            if let Err(e) = state.payments.refund(&reference).await {
                tracing::error!(error = %e, payment = %payment_key, "refund failed; reconciliation retries");
                return Err(ApiError::internal("refund failed"));
            }
            sqlx::query(
                "UPDATE payments SET status = 'refunded', provider_ref = $2, settled_at = now()
                 WHERE idempotency_key = $1",
            )
            .bind(payment_key)
            .bind(&reference)
            .execute(&state.pg)
            .await?;
            let done = Final::error(&refused);
            store(&state.pg, buyer, key, &done).await?;
            Ok(done)
        }
        Err(e) => Err(e),
    }
}

/// Records the final answer for retries with the same key (in the order's transaction when
/// there is one).
async fn store<'e>(
    db: impl sqlx::PgExecutor<'e>,
    buyer: &Buyer,
    key: &str,
    done: &Final,
) -> Result<(), ApiError> {
    sqlx::query(
        "UPDATE checkout_requests SET state = 'done', status_code = $3, response = $4
         WHERE jti = $1 AND idempotency_key = $2",
    )
    .bind(buyer.jti)
    .bind(key)
    .bind(i32::from(done.status.as_u16()))
    .bind(&done.body)
    .execute(db)
    .await?;
    Ok(())
}

#[allow(clippy::too_many_arguments)]
async fn commit(
    state: &AppState,
    buyer: &Buyer,
    key: &str,
    hold_id: Uuid,
    hold: &HoldRow,
    total: i64,
    payment_key: &str,
    reference: &str,
) -> Result<(Final, bool), ApiError> {
    let mut tx = state.pg.begin().await?;
    let seats = lock_seats(&mut tx, None, &hold.seat_ids).await?;
    let now = Utc::now();
    let still_ours = seats.len() == hold.seat_ids.len()
        && seats.iter().all(|s| {
            s.status == "held"
                && s.hold_id == Some(hold_id)
                && s.held_until.is_some_and(|t| t > now)
        });
    if !still_ours {
        return Err(ApiError::Conflict(
            "hold_expired",
            "the hold expired before payment completed; the charge was refunded".into(),
        ));
    }
    sqlx::query("UPDATE seats SET status = 'sold', held_until = NULL WHERE id = ANY($1)")
        .bind(&hold.seat_ids)
        .execute(&mut *tx)
        .await?;
    let order_id = Uuid::new_v4();
    let created_at: DateTime<Utc> = sqlx::query_scalar(
        "INSERT INTO orders (id, event_id, jti, identity, hold_id, total_cents, payment_ref)
         VALUES ($1, $2, $3, $4, $5, $6, $7) RETURNING created_at",
    )
    .bind(order_id)
    .bind(buyer.event.get())
    .bind(buyer.jti)
    .bind(&buyer.identity)
    .bind(hold_id)
    .bind(total)
    .bind(reference)
    .fetch_one(&mut *tx)
    .await
    .map_err(|e| match violated_constraint(&e) {
        Some("orders_one_per_pass") => ApiError::Conflict(
            "pass_used",
            "this pass has already been used for a purchase; the charge was refunded".into(),
        ),
        Some("orders_one_per_hold") => ApiError::Conflict(
            "hold_not_active",
            "this hold was already bought; the charge was refunded".into(),
        ),
        _ => ApiError::from(e),
    })?;
    let seat_ids: Vec<i64> = seats.iter().map(|s| s.id).collect();
    let codes: Vec<String> = seat_ids.iter().map(|_| ticket_code()).collect();
    sqlx::query(
        "INSERT INTO tickets (code, order_id, seat_id)
         SELECT code, $1, seat_id FROM UNNEST($2::text[], $3::bigint[]) AS t(code, seat_id)",
    )
    .bind(order_id)
    .bind(&codes)
    .bind(&seat_ids)
    .execute(&mut *tx)
    .await?;
    sqlx::query("UPDATE holds SET status = 'purchased' WHERE id = $1")
        .bind(hold_id)
        .execute(&mut *tx)
        .await?;
    let view = OrderView {
        order_id,
        event_id: buyer.event.get(),
        hold_id,
        status: "paid".into(),
        total_cents: total,
        payment_ref: reference.to_owned(),
        tickets: codes
            .into_iter()
            .zip(seat_ids.iter())
            .map(|(code, seat_id)| TicketView {
                code,
                seat_id: *seat_id,
            })
            .collect(),
        created_at,
    };
    let done = Final {
        status: StatusCode::CREATED,
        body: serde_json::to_value(&view).map_err(ApiError::internal)?,
    };
    store(&mut *tx, buyer, key, &done).await?;
    sqlx::query(
        "INSERT INTO outbox (event_id, identity, order_id, kind, payload)
         VALUES ($1, $2, $3, 'order_confirmed', $4)",
    )
    .bind(buyer.event.get())
    .bind(&buyer.identity)
    .bind(order_id)
    .bind(&done.body)
    .execute(&mut *tx)
    .await?;
    sqlx::query(
        "UPDATE payments SET status = 'succeeded', provider_ref = $2, settled_at = now()
         WHERE idempotency_key = $1",
    )
    .bind(payment_key)
    .bind(reference)
    .execute(&mut *tx)
    .await?;
    // The last seat sold: from now on the line is closed (the buffer answers 410).
    let sold_out = sqlx::query(
        "UPDATE events SET sold_out_at = now()
         WHERE id = $1 AND sold_out_at IS NULL AND NOT EXISTS (
             SELECT 1 FROM seats WHERE event_id = $1 AND status IN ('available', 'held'))",
    )
    .bind(buyer.event.get())
    .execute(&mut *tx)
    .await?
    .rows_affected()
        == 1;
    tx.commit().await?;
    Ok((done, sold_out))
}

/// An unguessable ticket code: 128 random bits in hex.
fn ticket_code() -> String {
    format!("FG-{}", Uuid::new_v4().simple()).to_uppercase()
}

/// Tells the admission controller the event is sold out, before the last buyer's slot is freed,
/// so that slot cannot let one more fan in.
async fn close_line(state: &AppState, buyer: &Buyer) {
    let result: Result<(), _> = state
        .redis
        .client()
        .set(
            state.redis.keys(buyer.event).sold_out(),
            1,
            None,
            None,
            false,
        )
        .await;
    if let Err(e) = result {
        tracing::warn!(error = %e, "could not flag the sold-out event in redis");
    }
}

/// Hands the shopper's slot back to the admission controller (idempotent: removing a removed
/// slot does nothing).
async fn finish_shopper(state: &AppState, buyer: &Buyer) {
    let keys = state.redis.keys(buyer.event);
    let result: Result<i64, _> = state
        .redis
        .client()
        .zrem(keys.slots(), format!("t:{}", buyer.ticket))
        .await;
    if let Err(e) = result {
        tracing::warn!(error = %e, "could not release the shopper's admission slot");
    }
}

#[instrument(skip_all, fields(event = %pass.event))]
async fn order(
    State(state): State<AppState>,
    pass: Pass,
    Path((_, order_id)): Path<(i64, Uuid)>,
) -> Result<Json<OrderView>, ApiError> {
    let view = load_order(&state.pg, order_id)
        .await?
        .filter(|(view, jti)| *jti == pass.claims.jti && view.event_id == pass.event.get())
        .ok_or_else(|| {
            ApiError::NotFound("order_not_found", "this pass has no such order".into())
        })?;
    Ok(Json(view.0))
}

/// An order with its tickets, and the pass that bought it.
pub(crate) async fn load_order(
    pg: &sqlx::PgPool,
    order_id: Uuid,
) -> Result<Option<(OrderView, Uuid)>, ApiError> {
    let Some(row) = sqlx::query_as::<_, OrderRow>(
        "SELECT id, event_id, hold_id, status, total_cents, payment_ref, created_at, jti
         FROM orders WHERE id = $1",
    )
    .bind(order_id)
    .fetch_optional(pg)
    .await?
    else {
        return Ok(None);
    };
    let tickets: Vec<(String, i64)> =
        sqlx::query_as("SELECT code, seat_id FROM tickets WHERE order_id = $1 ORDER BY seat_id")
            .bind(row.id)
            .fetch_all(pg)
            .await?;
    let view = OrderView {
        order_id: row.id,
        event_id: row.event_id,
        hold_id: row.hold_id,
        status: row.status,
        total_cents: row.total_cents,
        payment_ref: row.payment_ref,
        tickets: tickets
            .into_iter()
            .map(|(code, seat_id)| TicketView { code, seat_id })
            .collect(),
        created_at: row.created_at,
    };
    Ok(Some((view, row.jti)))
}

#[derive(sqlx::FromRow)]
struct OrderRow {
    id: Uuid,
    event_id: i64,
    hold_id: Uuid,
    status: String,
    total_cents: i64,
    payment_ref: String,
    created_at: DateTime<Utc>,
    jti: Uuid,
}
