//! Checkout: `POST /api/v1/events/{id}/checkout` with an `Idempotency-Key`. The key is claimed
//! first (one row per pass and key): the same key and body replay the stored answer, another
//! body is refused (422), and a retry while the first attempt runs gets 409. The card is charged
//! with no row lock held; then one transaction locks the hold's seats, checks the hold still
//! owns them, marks them sold, records the order (redeeming the pass's `jti`: one order per
//! buyer) and the stored answer. If the seats were lost meanwhile, the charge is refunded.
//!
//! Invariants, and where they are kept:
//! * Each claim of a key is an *attempt* with a lease on the key's payment (`attempt`, a
//!   fencing token, and `attempt_at`, migration 0040). Reconciliation only takes payments whose
//!   current attempt is older than its grace period, and takes the lease before acting; an
//!   attempt that fails gives its key and hold back only while the lease is still its own
//!   ([`give_back`]). So no one settles a payment whose attempt is live.
//! * A charge that backs an order is never refunded: the refund is decided in a transaction
//!   that locks the payment and finds no order holding that charge, before the provider is
//!   asked ([`decide`]); the order commit stores its answer in its own transaction.
//! * A key's stored answer is written once (only over a `running` request) and every later
//!   answer for the key is that stored answer, byte for byte ([`decide`] answers with what is
//!   stored, whoever stored it).

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use chrono::{DateTime, SubsecRound, Utc};
use serde::{Deserialize, Serialize};
use sha2::Digest;
use shared::error::violated_constraint;
use shared::extract::{Json, Path};
use shared::ids::{EventId, TicketId};
use shared::ApiError;
use tracing::instrument;
use uuid::Uuid;

use crate::begin_writer::NewStart;
use crate::order_writer::NewOrder;
use crate::passgate::Pass;
use crate::payments::ChargeOutcome;
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

    let (hold, payment_key, total, attempt) =
        match begin(&state, &buyer, &key, &hash, &request).await? {
            Begun::Answer(response) => return Ok(response),
            Begun::Claimed {
                hold,
                payment_key,
                total,
                attempt,
            } => (hold, payment_key, total, attempt),
        };
    // The charge and the order run to their end in a task of their own: a request that times
    // out (or a client that hangs up) must not cut a checkout between the provider's answer and
    // its record. The key's answer is stored either way, and a retry with the key gets it.
    let finishing = tokio::spawn(async move {
        let result =
            charge_and_commit(&state, &buyer, &key, &request, &hold, &payment_key, total).await;
        match result {
            Ok(done) => Ok(answer(&state, done.status, done.body)),
            Err(e) => {
                // Nothing was decided (the provider did not answer, or the order's outcome is
                // unknown): the key and the hold go back, so a retry runs again — unless another
                // attempt or reconciliation has taken the payment over meanwhile.
                let attempt = Attempt {
                    hold_id: request.hold_id,
                    jti: buyer.jti,
                    key: &key,
                    payment_key: &payment_key,
                    attempt,
                };
                give_back(&state.pg, &attempt).await?;
                Err(e)
            }
        }
    });
    finishing.await.map_err(ApiError::internal)?
}

/// One attempt at paying for a hold under a key: the lease it holds on the key's payment.
pub(crate) struct Attempt<'a> {
    pub hold_id: Uuid,
    pub jti: Uuid,
    pub key: &'a str,
    pub payment_key: &'a str,
    /// The payment's `attempt` this attempt claimed (its fencing token).
    pub attempt: i32,
}

/// Gives an attempt's key and hold back (the key may be claimed again, the hold paid for or
/// replaced), if the payment is still pending under this very attempt; with `abandoned`, the
/// payment is settled as never charged too (reconciliation, after the provider said so). The
/// hold's row, then the payment's, are locked first (the order every writer of both follows).
/// Returns whether it acted.
pub(crate) async fn give_back(pg: &sqlx::PgPool, a: &Attempt<'_>) -> Result<bool, ApiError> {
    release_attempt(pg, a, false).await
}

pub(crate) async fn abandon(pg: &sqlx::PgPool, a: &Attempt<'_>) -> Result<bool, ApiError> {
    release_attempt(pg, a, true).await
}

async fn release_attempt(
    pg: &sqlx::PgPool,
    a: &Attempt<'_>,
    abandoned: bool,
) -> Result<bool, ApiError> {
    let mut tx = pg.begin().await?;
    sqlx::query("SELECT 1 FROM holds WHERE id = $1 FOR UPDATE")
        .bind(a.hold_id)
        .execute(&mut *tx)
        .await?;
    let owned: Option<bool> = sqlx::query_scalar(
        "SELECT attempt = $2 AND status = 'pending' FROM payments
         WHERE idempotency_key = $1 FOR UPDATE",
    )
    .bind(a.payment_key)
    .bind(a.attempt)
    .fetch_optional(&mut *tx)
    .await?;
    if owned != Some(true) {
        return Ok(false);
    }
    if abandoned {
        sqlx::query(
            "UPDATE payments SET status = 'abandoned', settled_at = now()
             WHERE idempotency_key = $1",
        )
        .bind(a.payment_key)
        .execute(&mut *tx)
        .await?;
    }
    sqlx::query("UPDATE holds SET status = 'active' WHERE id = $1 AND status = 'paying'")
        .bind(a.hold_id)
        .execute(&mut *tx)
        .await?;
    sqlx::query(
        "DELETE FROM checkout_requests
         WHERE jti = $1 AND idempotency_key = $2 AND state = 'running'",
    )
    .bind(a.jti)
    .bind(a.key)
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(true)
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

#[derive(sqlx::FromRow)]
pub(crate) struct HoldRow {
    pub seat_ids: Vec<i64>,
}

/// How a checkout starts: with the answer a used key already has, or claimed for this request.
enum Begun {
    Answer(Response),
    Claimed {
        hold: HoldRow,
        payment_key: String,
        total: i64,
        attempt: i32,
    },
}

/// One round trip: a key already used answers with its stored answer (409 while it runs, 422
/// with another body); otherwise the key and the hold are claimed for this checkout and the
/// payment about to be taken is recorded (the record reconciliation starts from), in one
/// transaction shared with the checkouts starting at the same moment (`begin_writer.rs`). Nothing
/// is charged unless all three stand. A concurrent claim of the same key waits on the key's
/// primary key until the first commits, then answers as that one left it.
async fn begin(
    state: &AppState,
    buyer: &Buyer,
    key: &str,
    hash: &[u8],
    request: &CheckoutRequest,
) -> Result<Begun, ApiError> {
    let payment_key = format!("{}:{key}", buyer.jti);
    let outcome = state
        .begin_writer
        .submit(NewStart {
            event: buyer.event.get(),
            jti: buyer.jti,
            key: key.to_owned(),
            hash: hash.to_vec(),
            hold_id: request.hold_id,
            payment_key: payment_key.clone(),
            provider: state.payments.name(),
            identity: buyer.identity.clone(),
            ticket: buyer.ticket.0,
        })
        .await?;
    match outcome.code.as_str() {
        "claimed" => {
            let (Some(seat_ids), Some(total), Some(attempt)) =
                (outcome.seat_ids, outcome.total_cents, outcome.attempt)
            else {
                return Err(ApiError::internal(
                    "fg_checkout_begin claimed without a hold",
                ));
            };
            Ok(Begun::Claimed {
                hold: HoldRow { seat_ids },
                payment_key,
                total,
                attempt,
            })
        }
        "replay" => {
            let (Some(status), Some(body)) = (outcome.status_code, outcome.response) else {
                return Err(ApiError::internal("fg_checkout_begin replayed no answer"));
            };
            let status = StatusCode::from_u16(status as u16).map_err(ApiError::internal)?;
            Ok(Begun::Answer(answer(state, status, body)))
        }
        "key_reused" => Err(ApiError::Unprocessable(
            "idempotency_key_reused",
            "this Idempotency-Key was used with a different request body".into(),
        )),
        "key_running" => Err(ApiError::Conflict(
            "checkout_in_progress",
            "a checkout with this Idempotency-Key is still running; retry shortly".into(),
        )),
        "hold_not_found" => Err(ApiError::NotFound(
            "hold_not_found",
            "this pass has no such hold".into(),
        )),
        "pass_used" => Err(ApiError::Conflict(
            "pass_used",
            "this pass has already been used for a purchase".into(),
        )),
        "hold_paying" => Err(ApiError::Conflict(
            "checkout_in_progress",
            "this hold is already being paid for".into(),
        )),
        "hold_expired" => Err(ApiError::Conflict(
            "hold_expired",
            "this hold has expired; hold the seats again".into(),
        )),
        "hold_not_active" => Err(ApiError::Conflict(
            "hold_not_active",
            format!("this hold was {}", outcome.detail.unwrap_or_default()),
        )),
        other => Err(ApiError::internal(format!(
            "fg_checkout_begin answered {other:?}"
        ))),
    }
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
            metrics::counter!("fairgate_payments_total", "event" => buyer.event.to_string(),
                "outcome" => "provider_error")
            .increment(1);
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

/// Finishes a checkout once the provider has answered, and answers with what the key's answer
/// now is: a decline is recorded (402); a charge becomes an order, or is refunded if the seats
/// or the pass were lost meanwhile — unless the charge backs an order already (a duplicate of
/// the request committed it first), whose stored answer is then the answer. Used by checkout
/// and by reconciliation after a crash, so both decide the same way.
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
    let decision = Decision {
        jti: buyer.jti,
        key,
        hold_id,
        payment_key,
    };
    let outcome_label = match &outcome {
        ChargeOutcome::Declined { .. } => "declined",
        ChargeOutcome::Succeeded { .. } => "succeeded",
    };
    metrics::counter!("fairgate_payments_total", "event" => buyer.event.to_string(),
        "outcome" => outcome_label)
    .increment(1);
    let reference = match outcome {
        ChargeOutcome::Declined { code, message } => {
            let declined = Final::error(&ApiError::PaymentRequired(
                code,
                format!("{message}; your seats stay held until the hold expires"),
            ));
            return Ok(decide(&state.pg, &decision, None, declined).await?.0);
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
        Ok((done, _sold_out)) => {
            // The shopper's admission slot ended, and the event was marked sold out if this
            // was the last place, in the order's own transaction (migration 0028).
            crate::live::seats_changed(state, buyer.event, &hold.seat_ids, "sold");
            metrics::counter!("purchase_orders_total").increment(1);
            let event = buyer.event.to_string();
            metrics::counter!("fairgate_orders_total", "event" => event.clone()).increment(1);
            metrics::counter!("fairgate_revenue_cents_total", "event" => event)
                .increment(total.max(0) as u64);
            Ok(done)
        }
        Err(refused) if refused.status().is_client_error() => {
            // The seats or the pass were lost between charge and commit: give the money back,
            // unless this very charge is the one an order holds.
            let (done, refund) = decide(
                &state.pg,
                &decision,
                Some(&reference),
                Final::error(&refused),
            )
            .await?;
            if refund {
                finish_payment_refund(state, payment_key, &reference).await;
            }
            Ok(done)
        }
        Err(e) => Err(e),
    }
}

/// The payment a decision is about, and the key its answer is stored under.
struct Decision<'a> {
    jti: Uuid,
    key: &'a str,
    hold_id: Uuid,
    payment_key: &'a str,
}

/// Decides how a payment that did not become an order ends, in one transaction that locks the
/// hold's row and then the payment's: declined (`refund` is `None`), or to be refunded (the
/// charge `refund`) — only if the payment is still open and, for a refund, no order holds that
/// charge. The deciding call stores `answer` under the key (over a running request only, or as
/// a new row when the request was given back) and gives the hold back. Whoever decided, the
/// answer returned is the one stored under the key (a running key: 409, retry). Also returns
/// whether this call decided a refund, which the caller then asks the provider for.
async fn decide(
    pg: &sqlx::PgPool,
    d: &Decision<'_>,
    refund: Option<&str>,
    answer: Final,
) -> Result<(Final, bool), ApiError> {
    let mut tx = pg.begin().await?;
    sqlx::query("SELECT 1 FROM holds WHERE id = $1 FOR UPDATE")
        .bind(d.hold_id)
        .execute(&mut *tx)
        .await?;
    // Open: not settled yet, or settled as never charged by a reconciliation that was wrong.
    let open: bool = sqlx::query_scalar(
        "SELECT status = 'abandoned' OR (settled_at IS NULL AND status IN ('pending', 'succeeded'))
         FROM payments WHERE idempotency_key = $1 FOR UPDATE",
    )
    .bind(d.payment_key)
    .fetch_optional(&mut *tx)
    .await?
    .unwrap_or(false);
    let decided = match refund {
        None if open => {
            sqlx::query(
                "UPDATE payments SET status = 'declined', settled_at = now()
                 WHERE idempotency_key = $1",
            )
            .bind(d.payment_key)
            .execute(&mut *tx)
            .await?;
            true
        }
        Some(reference) if open => {
            // The order a charge backs has that charge's reference, and its hold's id.
            let backs_order: bool = sqlx::query_scalar(
                "SELECT EXISTS (SELECT 1 FROM orders WHERE hold_id = $1 AND payment_ref = $2)",
            )
            .bind(d.hold_id)
            .bind(reference)
            .fetch_one(&mut *tx)
            .await?;
            if !backs_order {
                sqlx::query(
                    "UPDATE payments SET status = 'refunding', provider_ref = $2
                     WHERE idempotency_key = $1",
                )
                .bind(d.payment_key)
                .bind(reference)
                .execute(&mut *tx)
                .await?;
            }
            !backs_order
        }
        _ => false,
    };
    if decided {
        sqlx::query(
            "INSERT INTO checkout_requests AS c (jti, idempotency_key, request_hash, state,
                                                 status_code, response)
             SELECT $1, $2, COALESCE(p.request_hash, '\\x'::BYTEA), 'done', $3, $4
             FROM payments p WHERE p.idempotency_key = $5
             ON CONFLICT (jti, idempotency_key) DO UPDATE
                 SET state = 'done', status_code = EXCLUDED.status_code,
                     response = EXCLUDED.response
                 WHERE c.state = 'running'",
        )
        .bind(d.jti)
        .bind(d.key)
        .bind(i32::from(answer.status.as_u16()))
        .bind(&answer.body)
        .bind(d.payment_key)
        .execute(&mut *tx)
        .await?;
        sqlx::query("UPDATE holds SET status = 'active' WHERE id = $1 AND status = 'paying'")
            .bind(d.hold_id)
            .execute(&mut *tx)
            .await?;
    }
    let stored = stored_answer(&mut *tx, d.jti, d.key).await?;
    tx.commit().await?;
    let done = stored.unwrap_or_else(|| {
        Final::error(&ApiError::Conflict(
            "checkout_in_progress",
            "a checkout with this Idempotency-Key is still running; retry shortly".into(),
        ))
    });
    Ok((done, decided && refund.is_some()))
}

/// The answer stored under a key, if its checkout has finished.
async fn stored_answer<'e>(
    db: impl sqlx::PgExecutor<'e>,
    jti: Uuid,
    key: &str,
) -> Result<Option<Final>, ApiError> {
    let row: Option<(i32, serde_json::Value)> = sqlx::query_as(
        "SELECT status_code, response FROM checkout_requests
         WHERE jti = $1 AND idempotency_key = $2 AND state = 'done'
           AND status_code IS NOT NULL AND response IS NOT NULL",
    )
    .bind(jti)
    .bind(key)
    .fetch_optional(db)
    .await?;
    row.map(|(status, body)| {
        let status = u16::try_from(status)
            .ok()
            .and_then(|s| StatusCode::from_u16(s).ok())
            .ok_or_else(|| ApiError::internal(format!("stored status {status}")))?;
        Ok(Final { status, body })
    })
    .transpose()
}

/// Returns a charge whose refund was decided (`refunding`) and records it refunded. A provider
/// that does not answer leaves the payment `refunding`: reconciliation asks again.
pub(crate) async fn finish_payment_refund(state: &AppState, payment_key: &str, reference: &str) {
    if let Err(e) = state.payments.refund(reference).await {
        tracing::error!(error = %e, payment = %payment_key, "refund failed; reconciliation retries");
        return;
    }
    let marked = sqlx::query(
        "UPDATE payments SET status = 'refunded', settled_at = now()
         WHERE idempotency_key = $1 AND status = 'refunding'",
    )
    .bind(payment_key)
    .execute(&state.pg)
    .await;
    if let Err(e) = marked {
        tracing::warn!(error = %e, payment = %payment_key, "refund not recorded; reconciliation retries");
    }
}

/// Sells the hold's seats through the order writer (group commit, `order_writer.rs`): if the
/// hold still owns every seat (locked in id order), the seats, the order with its tickets, the
/// answer stored for retries, the outbox row, the settled payment and the sold-out mark are
/// written in one transaction, shared with the other orders ready at that moment. Returns the
/// answer and whether this sold the last place.
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
    let order_id = Uuid::now_v7();
    // Whole microseconds, as Postgres keeps them: the answer matches the stored order.
    let created_at = Utc::now().trunc_subsecs(6);
    let mut seat_ids = hold.seat_ids.clone();
    seat_ids.sort_unstable();
    let codes: Vec<String> = seat_ids.iter().map(|_| ticket_code()).collect();
    let view = OrderView {
        order_id,
        event_id: buyer.event.get(),
        hold_id,
        status: "paid".into(),
        total_cents: total,
        payment_ref: reference.to_owned(),
        tickets: codes
            .iter()
            .zip(seat_ids.iter())
            .map(|(code, seat_id)| TicketView {
                code: code.clone(),
                seat_id: *seat_id,
            })
            .collect(),
        created_at,
    };
    let done = Final {
        status: StatusCode::CREATED,
        body: serde_json::to_value(&view).map_err(ApiError::internal)?,
    };
    let (code, sold_out) = state
        .order_writer
        .commit(NewOrder {
            event: buyer.event.get(),
            jti: buyer.jti,
            identity: buyer.identity.clone(),
            hold_id,
            seat_ids,
            codes,
            total_cents: total,
            reference: reference.to_owned(),
            order_id,
            created_at,
            key: key.to_owned(),
            body: done.body.clone(),
            payment_key: payment_key.to_owned(),
        })
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
    match code.as_str() {
        "ordered" => Ok((done, sold_out)),
        "hold_expired" => Err(ApiError::Conflict(
            "hold_expired",
            "the hold expired before payment completed; the charge was refunded".into(),
        )),
        other => Err(ApiError::internal(format!(
            "fg_commit_order answered {other:?}"
        ))),
    }
}

/// An unguessable ticket code: 128 random bits in hex.
fn ticket_code() -> String {
    format!("FG-{}", Uuid::new_v4().simple()).to_uppercase()
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
