//! A model-based test of the purchase lifecycle (`proptest-state-machine`): random sequences of
//! holds, releases, checkouts (the same and other Idempotency-Keys, good and declined cards),
//! provider answers (at once, an outage, a timeout, slow — answered later, — a charge whose
//! process dies before the order), reconciliation runs, the hold sweeper, holds expiring,
//! attempts' leases lapsing, refunds and restarts, run against the real service, the real
//! Postgres functions and a provider whose answers and timing the test controls
//! (`provider.rs`). Time moves by moving the sale's timestamps in Postgres, never by sleeping.
//!
//! After every step:
//! * no seat is on two valid tickets, and a seat is sold exactly when it is on one;
//! * every paid order has one live charge for its total, and once its payments are settled its
//!   pass has no other live charge;
//! * a pass's seats over its holds that are active or being paid for stay within its limit;
//! * each key's stored answer matches what happened (201: that order with that charge; 402: a
//!   declined charge; a refusal saying "refunded": a refunded charge no order holds), every
//!   final answer a client got for a key is the same bytes, and nothing answers 500;
//! * a refund returns its order's seats, once.
//!
//! At the end, every live request is answered, leases lapse and reconciliation runs until
//! every payment is settled; then no live charge is without its paid order, no hold is left
//! being paid for (which would bar its pass from holding again), and replaying each key gives
//! the same bytes as every final answer it gave before.
//!
//! `FAIRGATE_MODEL_CASES` sets the number of random sequences (default 12, for the normal
//! suite); README gives the command for thousands. Shrunk counterexamples are kept as the
//! explicit tests at the end (and in proptest's regressions file).

use std::cell::RefCell;
use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use proptest::prelude::*;
use proptest::test_runner::{Config, FileFailurePersistence, TestRunner};
use proptest_state_machine::{ReferenceStateMachine, StateMachineTest};
use reqwest::Client;
use serde_json::{json, Value};
use shared::config::CommonConfig;
use shared::testing::TestEnv;
use shared::token::{Signer, SigningKey};
use uuid::Uuid;

use crate::money_edges::{pass_of, Answer};
use crate::provider::{Charge, Gate, Scripted};

const FANS: usize = 2;
const SEATS: usize = 6;
const KEYS: usize = 2;
/// The service's reconciliation grace (`in_process_on`) and hold lifetime, and a bit more.
const LEASE_LAPSE_SECS: i64 = 61;
const HOLD_EXPIRY_SECS: i64 = 301;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Card {
    Good,
    Declined,
}

impl Card {
    fn token(self) -> &'static str {
        match self {
            Card::Good => "tok_visa",
            Card::Declined => "tok_chargeDeclined",
        }
    }
}

#[derive(Clone, Debug)]
pub enum Step {
    /// A hold of these seats (1 to 3 of them: 3 is over the pass's limit).
    Hold {
        fan: usize,
        seats: Vec<usize>,
    },
    /// Releases the fan's last hold.
    Release {
        fan: usize,
    },
    /// Pays for the fan's last hold under one of its keys; the provider does `charge`.
    Checkout {
        fan: usize,
        key: usize,
        card: Card,
        charge: Charge,
    },
    /// The oldest charge waiting at the provider ends so.
    Answer(Gate),
    Reconcile,
    Sweep,
    /// Every hold of the sale reaches its expiry.
    Expire,
    /// Time passes beyond the reconciliation grace: requests still at the provider have timed
    /// out (they end as an outage) and every attempt's lease lapses.
    Lapse,
    /// Support refunds the fan's order.
    Refund {
        fan: usize,
    },
    /// The process dies and starts again; charges waiting at the provider never answer
    /// (charged or not).
    Restart {
        charged: bool,
    },
}

fn charge_strategy() -> impl Strategy<Value = Charge> {
    prop_oneof![
        3 => Just(Charge::Answer),
        2 => Just(Charge::Outage),
        1 => Just(Charge::Timeout),
        3 => Just(Charge::Slow),
        1 => Just(Charge::DiesAfterCharging),
    ]
}

fn gate_strategy() -> impl Strategy<Value = Gate> {
    prop_oneof![
        4 => Just(Gate::Answer),
        1 => Just(Gate::Outage),
        1 => Just(Gate::Timeout),
        1 => Just(Gate::DiesAfterCharging),
    ]
}

/// The reference model: the steps are valid in any order (the service must answer each one
/// precisely whatever came before), so it keeps no state of its own.
pub struct Lifecycle;

impl ReferenceStateMachine for Lifecycle {
    type State = ();
    type Transition = Step;

    fn init_state() -> BoxedStrategy<()> {
        Just(()).boxed()
    }

    fn transitions(_: &()) -> BoxedStrategy<Step> {
        let fan = 0..FANS;
        prop_oneof![
            4 => (fan.clone(), proptest::sample::subsequence((0..SEATS).collect::<Vec<_>>(), 1..=3))
                .prop_map(|(fan, seats)| Step::Hold { fan, seats }),
            1 => fan.clone().prop_map(|fan| Step::Release { fan }),
            5 => (fan.clone(), 0..KEYS, prop_oneof![4 => Just(Card::Good), 1 => Just(Card::Declined)], charge_strategy())
                .prop_map(|(fan, key, card, charge)| Step::Checkout { fan, key, card, charge }),
            3 => gate_strategy().prop_map(Step::Answer),
            3 => Just(Step::Reconcile),
            1 => Just(Step::Sweep),
            1 => Just(Step::Expire),
            2 => Just(Step::Lapse),
            1 => fan.prop_map(|fan| Step::Refund { fan }),
            1 => any::<bool>().prop_map(|charged| Step::Restart { charged }),
        ]
        .boxed()
    }

    fn apply(state: (), _: &Step) {
        state
    }
}

thread_local! {
    /// The database and Redis the cases of this thread run against (one database per test
    /// function; each case has an event of its own in it).
    static COMMON: RefCell<Option<CommonConfig>> = const { RefCell::new(None) };
}

struct Fan {
    pass: String,
    jti: Uuid,
    /// The fan's last hold that was granted.
    hold: Option<String>,
}

/// A key's final answer, and the request (hold, card) it answered.
type Finals = (Answer, (String, Card));

/// A checkout request sent and not answered yet.
struct Flight {
    fan: usize,
    key: usize,
    body: (String, Card),
    answer: tokio::task::JoinHandle<Answer>,
}

/// The sale under test, and the runtime its service and requests run on (one per case: its
/// end ends every task the case left, requests that never answer included).
pub struct Harness {
    rt: tokio::runtime::Runtime,
    sale: Sale,
}

pub struct Sale {
    common: CommonConfig,
    pg: sqlx::PgPool,
    app: Option<shared::server::RunningApp>,
    state: purchase::AppState,
    url: String,
    http: Client,
    signer: Signer,
    provider: Scripted,
    event: i64,
    seats: Vec<i64>,
    fans: Vec<Fan>,
    flights: Vec<Flight>,
    /// Final answers each (fan, key) got, with the request that got them.
    finals: BTreeMap<(usize, usize), Vec<Finals>>,
    /// Orders refunded by the test.
    refunded: HashMap<Uuid, Vec<i64>>,
}

/// Whether a checkout answer is a key's final answer (what is stored for it), as opposed to a
/// refusal that changed nothing (a running key, a hold that cannot be paid for) or an outage.
fn is_final(answer: &Answer) -> bool {
    match answer.status {
        201 | 402 => true,
        409 => answer.json()["message"]
            .as_str()
            .is_some_and(|m| m.contains("refunded")),
        _ => false,
    }
}

impl Sale {
    fn payment_key(&self, fan: usize, key: usize) -> String {
        format!("{}:k{key}", self.fans[fan].jti)
    }

    /// Sends the fan's checkout and waits until it is answered or waits at the provider.
    async fn checkout(&mut self, fan: usize, key: usize, card: Card, charge: Charge) {
        let hold = self.fans[fan]
            .hold
            .clone()
            .unwrap_or_else(|| Uuid::nil().to_string());
        self.provider.plan(&self.payment_key(fan, key), charge);
        let (http, url, event, pass) = (
            self.http.clone(),
            self.url.clone(),
            self.event,
            self.fans[fan].pass.clone(),
        );
        let hold_id = hold.clone();
        let answer = tokio::spawn(async move {
            crate::money_edges::pay(
                &http,
                &url,
                event,
                &pass,
                &format!("k{key}"),
                &hold_id,
                card.token(),
            )
            .await
        });
        self.flights.push(Flight {
            fan,
            key,
            body: (hold, card),
            answer,
        });
        self.land().await;
    }

    /// Waits until every request sent is answered, waits at the provider or never will answer
    /// (its process is taken as dead), and records the answers.
    async fn land(&mut self) {
        for _ in 0..20_000 {
            let mut still = Vec::new();
            for flight in std::mem::take(&mut self.flights) {
                if flight.answer.is_finished() {
                    let answer = flight.answer.await.expect("the request's task");
                    self.record(flight.fan, flight.key, flight.body, answer);
                } else {
                    still.push(flight);
                }
            }
            self.flights = still;
            let parked = self.provider.waiting().len() + self.provider.hung().len();
            if self.flights.len() == parked {
                return;
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        panic!("a request neither answered nor reached the provider");
    }

    fn record(&mut self, fan: usize, key: usize, body: (String, Card), answer: Answer) {
        assert!(
            answer.status != 500,
            "a 5xx is a bug: {}",
            String::from_utf8_lossy(&answer.body)
        );
        let known = [201, 402, 404, 409, 422, 503];
        assert!(
            known.contains(&answer.status),
            "unexpected checkout answer {} {}",
            answer.status,
            String::from_utf8_lossy(&answer.body)
        );
        if is_final(&answer) {
            let finals = self.finals.entry((fan, key)).or_default();
            if let Some((first, _)) = finals.first() {
                assert_eq!(
                    String::from_utf8_lossy(&answer.body),
                    String::from_utf8_lossy(&first.body),
                    "the key's final answers are the same bytes"
                );
                assert_eq!(answer.status, first.status);
            }
            finals.push((answer, body));
        }
    }

    async fn hold(&mut self, fan: usize, seats: &[usize]) {
        let ids: Vec<i64> = seats.iter().map(|s| self.seats[*s]).collect();
        let answer = crate::money_edges::hold(
            &self.http,
            &self.url,
            self.event,
            &self.fans[fan].pass,
            &ids,
        )
        .await;
        match answer.status {
            201 => {
                self.fans[fan].hold = Some(
                    answer.json()["hold_id"]
                        .as_str()
                        .expect("hold id")
                        .to_owned(),
                );
            }
            409 | 422 => {
                let code = answer.json()["error"]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned();
                assert!(
                    [
                        "seat_unavailable",
                        "pass_used",
                        "checkout_in_progress",
                        "invalid_field"
                    ]
                    .contains(&code.as_str()),
                    "hold refused with {code}"
                );
                assert!(
                    ids.len() <= 2 || code == "invalid_field",
                    "over the limit is invalid"
                );
            }
            other => panic!(
                "hold answered {other}: {}",
                String::from_utf8_lossy(&answer.body)
            ),
        }
    }

    async fn release(&mut self, fan: usize) {
        let Some(hold) = self.fans[fan].hold.clone() else {
            return;
        };
        let answer = self
            .http
            .delete(format!(
                "{}/api/v1/events/{}/holds/{hold}",
                self.url, self.event
            ))
            .bearer_auth(&self.fans[fan].pass)
            .send()
            .await
            .expect("release");
        let status = answer.status().as_u16();
        assert!(status == 204 || status == 404, "release answered {status}");
    }

    async fn refund(&mut self, fan: usize) {
        let order: Option<(Uuid, String)> =
            sqlx::query_as("SELECT id, status FROM orders WHERE jti = $1")
                .bind(self.fans[fan].jti)
                .fetch_optional(&self.pg)
                .await
                .expect("order");
        let Some((order, _)) = order else {
            return;
        };
        let sold: Vec<i64> = sqlx::query_scalar(
            "SELECT seat_id FROM tickets WHERE order_id = $1 AND status = 'valid' ORDER BY 1",
        )
        .bind(order)
        .fetch_all(&self.pg)
        .await
        .expect("tickets");
        let answer = Answer::of(
            self.http
                .post(format!("{}/api/v1/support/orders/{order}/refund", self.url))
                .bearer_auth(crate::SUPPORT)
                .send()
                .await
                .expect("refund"),
        )
        .await;
        if self.refunded.contains_key(&order) {
            assert_eq!(
                (answer.status, answer.json()["error"].as_str()),
                (409, Some("already_refunded")),
                "a refund returns its seats once"
            );
            return;
        }
        assert_eq!(
            answer.status,
            200,
            "{}",
            String::from_utf8_lossy(&answer.body)
        );
        let returned: Vec<i64> =
            serde_json::from_value(answer.json()["seats_returned"].clone()).expect("seats");
        assert_eq!(returned, sold, "the refund returns the order's seats");
        self.refunded.insert(order, returned);
    }

    /// Time passes beyond the grace period: live requests time out first.
    async fn lapse(&mut self) {
        while self.provider.release_oldest(Gate::Outage) {}
        self.land().await;
        crate::money_edges::age_payments(&self.pg, LEASE_LAPSE_SECS).await;
    }

    async fn expire(&self) {
        sqlx::query(
            "UPDATE holds SET expires_at = expires_at - make_interval(secs => $2)
             WHERE event_id = $1",
        )
        .bind(self.event)
        .bind(HOLD_EXPIRY_SECS as f64)
        .execute(&self.pg)
        .await
        .expect("expire holds");
        sqlx::query(
            "UPDATE seats SET held_until = held_until - make_interval(secs => $2)
             WHERE event_id = $1 AND held_until IS NOT NULL",
        )
        .bind(self.event)
        .bind(HOLD_EXPIRY_SECS as f64)
        .execute(&self.pg)
        .await
        .expect("expire seats");
    }

    async fn restart(&mut self, charged: bool) {
        let how = if charged {
            Gate::DiesAfterCharging
        } else {
            Gate::Hang
        };
        while self.provider.release_oldest(how) {}
        self.land().await;
        if let Some(app) = self.app.take() {
            drop(app);
        }
        let (app, state) =
            crate::in_process_on(self.common.clone(), &self.signer, &self.provider, |_| {}).await;
        self.url = app.url();
        self.app = Some(app);
        self.state = state;
    }

    async fn step(&mut self, step: Step) {
        match step {
            Step::Hold { fan, seats } => self.hold(fan, &seats).await,
            Step::Release { fan } => self.release(fan).await,
            Step::Checkout {
                fan,
                key,
                card,
                charge,
            } => self.checkout(fan, key, card, charge).await,
            Step::Answer(how) => {
                self.provider.release_oldest(how);
                self.land().await;
            }
            Step::Reconcile => {
                purchase::reconcile::reconcile_once(&self.state)
                    .await
                    .expect("reconciliation runs without error");
            }
            Step::Sweep => purchase::seats::sweep_once(&self.state).await,
            Step::Expire => self.expire().await,
            Step::Lapse => self.lapse().await,
            Step::Refund { fan } => self.refund(fan).await,
            Step::Restart { charged } => self.restart(charged).await,
        }
    }

    /// The invariants that hold after every step.
    async fn check(&self) {
        let (twice, sold_mismatch): (i64, i64) = sqlx::query_as(
            "SELECT
               (SELECT count(*) FROM (SELECT t.seat_id FROM tickets t
                                      JOIN seats s ON s.id = t.seat_id
                                      WHERE s.event_id = $1 AND t.status = 'valid'
                                      GROUP BY t.seat_id HAVING count(*) > 1) d),
               (SELECT count(*) FROM seats s WHERE s.event_id = $1 AND (s.status = 'sold') <>
                    EXISTS (SELECT 1 FROM tickets t WHERE t.seat_id = s.id AND t.status = 'valid'))",
        )
        .bind(self.event)
        .fetch_one(&self.pg)
        .await
        .expect("seats");
        assert_eq!(twice, 0, "a seat on two valid tickets");
        assert_eq!(
            sold_mismatch, 0,
            "sold seats are exactly those on a valid ticket"
        );

        let charges = self.provider.charges();
        let orders: Vec<(Uuid, Uuid, String, i64, String)> = sqlx::query_as(
            "SELECT id, jti, payment_ref, total_cents, status FROM orders WHERE event_id = $1",
        )
        .bind(self.event)
        .fetch_all(&self.pg)
        .await
        .expect("orders");
        for (order, jti, reference, total, status) in &orders {
            if status != "paid" {
                continue;
            }
            let backing: Vec<_> = charges
                .values()
                .filter(|c| &c.reference == reference)
                .collect();
            assert!(
                backing.len() == 1
                    && backing[0].succeeded
                    && !backing[0].refunded
                    && backing[0].amount_cents == *total,
                "paid order {order} has one live charge for its total: {backing:?}"
            );
            // Its pass's other charges, once their payments are settled, are not live.
            let settled: Vec<String> = sqlx::query_scalar(
                "SELECT idempotency_key FROM payments WHERE jti = $1 AND settled_at IS NOT NULL",
            )
            .bind(jti)
            .fetch_all(&self.pg)
            .await
            .expect("payments");
            let live_settled = settled
                .iter()
                .filter_map(|k| charges.get(k))
                .filter(|c| c.succeeded && !c.refunded)
                .count();
            assert_eq!(live_settled, 1, "pass {jti} is charged once: {charges:?}");
        }

        for fan in &self.fans {
            let (holds, seats): (i64, i64) = sqlx::query_as(
                "SELECT count(*), COALESCE(sum(cardinality(seat_ids)), 0)::BIGINT FROM holds
                 WHERE jti = $1 AND status IN ('active', 'paying')",
            )
            .bind(fan.jti)
            .fetch_one(&self.pg)
            .await
            .expect("holds");
            assert!(
                seats <= 2 && holds <= 1,
                "a pass holds within its limit: {holds} holds of {seats} seats"
            );
        }

        let stored: Vec<(Uuid, String, i32, Value)> = sqlx::query_as(
            "SELECT c.jti, c.idempotency_key, c.status_code, c.response
             FROM checkout_requests c WHERE c.jti = ANY($1) AND c.state = 'done'",
        )
        .bind(self.fans.iter().map(|f| f.jti).collect::<Vec<_>>())
        .fetch_all(&self.pg)
        .await
        .expect("answers");
        for (jti, key, status, body) in stored {
            let booked = charges.get(&format!("{jti}:{key}"));
            match status {
                201 => {
                    let order = Uuid::parse_str(body["order_id"].as_str().expect("order id"))
                        .expect("uuid");
                    let (order_jti, reference): (Uuid, String) =
                        sqlx::query_as("SELECT jti, payment_ref FROM orders WHERE id = $1")
                            .bind(order)
                            .fetch_one(&self.pg)
                            .await
                            .expect("the stored order exists");
                    assert_eq!(order_jti, jti);
                    assert_eq!(body["payment_ref"], json!(reference));
                }
                402 => assert!(
                    booked.is_some_and(|c| !c.succeeded),
                    "402 stored for a charge not declined: {booked:?}"
                ),
                409 => {
                    let charge = booked.expect("a refund of a charge");
                    // Decided and stored, then asked of the provider: in between (a step can
                    // run beside a reconciliation, or cut it short with a restart) the payment
                    // says `refunding`, which reconciliation finishes.
                    let payment: String = sqlx::query_scalar(
                        "SELECT status FROM payments WHERE idempotency_key = $1",
                    )
                    .bind(format!("{jti}:{key}"))
                    .fetch_one(&self.pg)
                    .await
                    .expect("payment");
                    assert!(
                        charge.succeeded && (charge.refunded || payment == "refunding"),
                        "a refund stored for a live charge: {charge:?} {payment} {body}"
                    );
                    assert!(
                        !orders.iter().any(|o| o.2 == charge.reference),
                        "a refunded charge backs no order"
                    );
                }
                other => panic!("stored answer {other}: {body}"),
            }
        }
        for (order, _) in self.refunded.iter() {
            let valid: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM tickets WHERE order_id = $1 AND status = 'valid'",
            )
            .bind(order)
            .fetch_one(&self.pg)
            .await
            .expect("tickets");
            assert_eq!(valid, 0, "a refunded order keeps no valid ticket");
        }
    }

    /// Every live request answered, then reconciliation until every payment is settled; then
    /// nothing charged is left without its order, and every key replays its final answer.
    async fn finish(&mut self) {
        while self.provider.release_oldest(Gate::Answer) {}
        self.land().await;
        for _ in 0..4 {
            self.lapse().await;
            purchase::reconcile::reconcile_once(&self.state)
                .await
                .expect("reconciliation runs without error");
        }
        self.check().await;
        let open: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM payments WHERE event_id = $1 AND settled_at IS NULL",
        )
        .bind(self.event)
        .fetch_one(&self.pg)
        .await
        .expect("payments");
        assert_eq!(open, 0, "every payment settled");
        let paying: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM holds WHERE event_id = $1 AND status = 'paying'",
        )
        .bind(self.event)
        .fetch_one(&self.pg)
        .await
        .expect("holds");
        assert_eq!(
            paying, 0,
            "no hold stays being paid for once its payment is settled"
        );
        let paid: Vec<String> = sqlx::query_scalar(
            "SELECT payment_ref FROM orders WHERE event_id = $1 AND status = 'paid'",
        )
        .bind(self.event)
        .fetch_all(&self.pg)
        .await
        .expect("orders");
        let ours: Vec<String> = (0..FANS)
            .flat_map(|f| (0..KEYS).map(move |k| (f, k)))
            .map(|(f, k)| self.payment_key(f, k))
            .collect();
        for (key, charge) in self.provider.charges() {
            if ours.contains(&key) && charge.succeeded && !charge.refunded {
                assert!(
                    paid.contains(&charge.reference),
                    "a live charge without its paid order: {key} {charge:?}"
                );
            }
        }
        let finals = std::mem::take(&mut self.finals);
        for ((fan, key), answers) in &finals {
            let (first, (hold, card)) = &answers[0];
            let replay = crate::money_edges::pay(
                &self.http,
                &self.url,
                self.event,
                &self.fans[*fan].pass,
                &format!("k{key}"),
                hold,
                card.token(),
            )
            .await;
            assert_eq!(
                String::from_utf8_lossy(&replay.body),
                String::from_utf8_lossy(&first.body),
                "a replay of the key gives its final answer, byte for byte"
            );
        }
    }
}

impl StateMachineTest for Sale {
    type SystemUnderTest = Harness;
    type Reference = Lifecycle;

    fn init_test(_: &()) -> Harness {
        let common = COMMON
            .with(|c| c.borrow().clone())
            .expect("the test's database");
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("runtime");
        let signer = Signer::new(SigningKey::generate().expect("key"), "fairgate");
        let provider = Scripted::new();
        let (pg, app, state, event, seats) = rt.block_on(async {
            let pg = shared::db::connect_url(&common.database_url, 3)
                .await
                .expect("pool");
            let (app, state) =
                crate::in_process_on(common.clone(), &signer, &provider, |_| {}).await;
            let http = Client::new();
            let event = crate::create_event_with(&http, &app.url(), 1, SEATS as i32).await;
            let seats = crate::seat_ids(&pg, event).await;
            (pg, app, state, event, seats)
        });
        let fans = (0..FANS)
            .map(|_| {
                let (pass, jti) = pass_of(&signer, event);
                Fan {
                    pass,
                    jti,
                    hold: None,
                }
            })
            .collect();
        let sale = Sale {
            url: app.url(),
            app: Some(app),
            common,
            pg,
            state,
            http: Client::new(),
            signer,
            provider,
            event,
            seats,
            fans,
            flights: Vec::new(),
            finals: BTreeMap::new(),
            refunded: HashMap::new(),
        };
        Harness { rt, sale }
    }

    fn apply(mut harness: Harness, _: &(), step: Step) -> Harness {
        harness.rt.block_on(harness.sale.step(step));
        harness
    }

    fn check_invariants(harness: &Harness, _: &()) {
        harness.rt.block_on(harness.sale.check());
    }

    fn teardown(mut harness: Harness, _: ()) {
        harness.rt.block_on(async {
            harness.sale.finish().await;
            if let Some(app) = harness.sale.app.take() {
                drop(app);
            }
            harness.sale.pg.close().await;
        });
        harness.rt.shutdown_background();
    }
}

/// Runs `run` with a database of its own for the cases of this thread.
fn with_database(run: impl FnOnce()) {
    let setup = tokio::runtime::Runtime::new().expect("runtime");
    let env = setup.block_on(TestEnv::new());
    COMMON.with(|c| *c.borrow_mut() = Some(env.common_config()));
    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(run));
    COMMON.with(|c| *c.borrow_mut() = None);
    setup.block_on(env.cleanup());
    if let Err(panic) = outcome {
        std::panic::resume_unwind(panic);
    }
}

fn cases() -> u32 {
    std::env::var("FAIRGATE_MODEL_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(12)
}

#[test]
fn the_purchase_lifecycle_keeps_its_invariants_under_random_interleavings() {
    with_database(|| {
        let config = Config {
            cases: cases(),
            max_shrink_iters: 2_000,
            failure_persistence: Some(Box::new(FileFailurePersistence::Direct(
                "tests/api/model.proptest-regressions",
            ))),
            ..Config::default()
        };
        let mut runner = TestRunner::new(config.clone());
        let result = runner.run(
            &Lifecycle::sequential_strategy(1..30),
            |(state, steps, seen)| {
                Sale::test_sequential(config.clone(), state, steps, seen);
                Ok(())
            },
        );
        if let Err(e) = result {
            panic!("{e}");
        }
    });
}

/// Runs one sequence of steps as a case of the model.
fn replay(steps: Vec<Step>) {
    with_database(|| Sale::test_sequential(Config::default(), (), steps, None));
}

/// The first defect of issue 18 as the model finds it: a checkout fails in an outage, its
/// retry waits at the provider after the first attempt's lease lapsed, reconciliation runs,
/// and a duplicate of the request arrives before the provider answers the retry.
#[test]
fn model_regression_reconciliation_during_a_retry_with_a_duplicate() {
    replay(vec![
        Step::Hold {
            fan: 0,
            seats: vec![0, 1],
        },
        Step::Checkout {
            fan: 0,
            key: 0,
            card: Card::Good,
            charge: Charge::Outage,
        },
        Step::Lapse,
        Step::Checkout {
            fan: 0,
            key: 0,
            card: Card::Good,
            charge: Charge::Slow,
        },
        Step::Reconcile,
        Step::Checkout {
            fan: 0,
            key: 0,
            card: Card::Good,
            charge: Charge::Answer,
        },
        Step::Answer(Gate::Answer),
    ]);
}

/// The second defect as the model finds it: a new hold while the first is being paid for,
/// then the card declined.
#[test]
fn model_regression_a_declined_hold_next_to_a_new_one() {
    replay(vec![
        Step::Hold {
            fan: 1,
            seats: vec![0, 1],
        },
        Step::Checkout {
            fan: 1,
            key: 0,
            card: Card::Declined,
            charge: Charge::Slow,
        },
        Step::Hold {
            fan: 1,
            seats: vec![2, 3],
        },
        Step::Answer(Gate::Answer),
    ]);
}

/// A charge whose process died before the order, found by reconciliation after a restart,
/// and a retry of its key from before the lease lapsed.
#[test]
fn model_regression_a_crash_after_the_charge_is_sold_once() {
    replay(vec![
        Step::Hold {
            fan: 1,
            seats: vec![4],
        },
        Step::Checkout {
            fan: 1,
            key: 1,
            card: Card::Good,
            charge: Charge::DiesAfterCharging,
        },
        Step::Restart { charged: true },
        Step::Checkout {
            fan: 1,
            key: 1,
            card: Card::Good,
            charge: Charge::Answer,
        },
        Step::Lapse,
        Step::Reconcile,
        Step::Checkout {
            fan: 1,
            key: 1,
            card: Card::Good,
            charge: Charge::Answer,
        },
        Step::Refund { fan: 1 },
        Step::Refund { fan: 1 },
    ]);
}

/// Found by the model on the code before issue 18 (shrunk): after a restart, the new
/// instance's first reconciliation run and another one settle the same crashed checkout at
/// once; one commits the order, the other's commit is refused and it refunded the charge the
/// order holds. Now the first to take the lease settles it, and a charge an order holds is
/// never refunded.
#[test]
fn model_regression_two_reconciliation_runs_after_a_restart() {
    use Step::*;
    replay(vec![
        Sweep,
        Answer(Gate::Answer),
        Reconcile,
        Lapse,
        Expire,
        Hold {
            fan: 1,
            seats: vec![0, 3],
        },
        Reconcile,
        Answer(Gate::Answer),
        Reconcile,
        Lapse,
        Lapse,
        Reconcile,
        Hold {
            fan: 1,
            seats: vec![0, 5],
        },
        Hold {
            fan: 0,
            seats: vec![1, 4],
        },
        Restart { charged: false },
        Reconcile,
        Hold {
            fan: 0,
            seats: vec![5],
        },
        Release { fan: 1 },
        Lapse,
        Checkout {
            fan: 1,
            key: 1,
            card: Card::Good,
            charge: Charge::Slow,
        },
        Checkout {
            fan: 0,
            key: 1,
            card: Card::Good,
            charge: Charge::DiesAfterCharging,
        },
        Answer(Gate::Answer),
        Reconcile,
        Hold {
            fan: 0,
            seats: vec![2, 3, 4],
        },
        Answer(Gate::Answer),
        Answer(Gate::DiesAfterCharging),
        Restart { charged: false },
    ]);
}
