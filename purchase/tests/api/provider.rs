//! A payment provider whose answers and timing the test controls: each charge and lookup
//! follows the behaviour set for its key (answer at once, or wait at a gate until the test
//! answers it), and the provider's books (one charge per key, the first decides, refunds by
//! reference) are kept in memory for the test to check against Postgres.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use purchase::payments::{ChargeOutcome, PaymentError, PaymentProvider};
use tokio::sync::{oneshot, Notify};

/// What the provider does with a charge.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Charge {
    /// Charges (or declines, by token) and answers at once.
    Answer,
    /// Down: charges nothing, answers an error.
    Outage,
    /// Charges, but the answer is lost: an error.
    Timeout,
    /// Waits at the gate until the test says what happens ([`Gate`]).
    Slow,
    /// Charges, then never answers (the process dies between the charge and the order).
    DiesAfterCharging,
}

/// How a charge waiting at the gate ends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Gate {
    Answer,
    Outage,
    Timeout,
    DiesAfterCharging,
    /// Never answers, charging nothing (the process died before the provider was reached).
    Hang,
}

/// One charge as the provider's books hold it.
#[derive(Clone, Debug)]
pub struct Booked {
    pub reference: String,
    pub amount_cents: i64,
    pub succeeded: bool,
    pub refunded: bool,
}

#[derive(Default)]
struct Books {
    charges: HashMap<String, Booked>,
    /// Behaviour of the next charges of a key (the last one set stays).
    plans: HashMap<String, Charge>,
    /// Charges waiting at the gate, oldest first: key, and how to wake it.
    waiting: VecDeque<(String, oneshot::Sender<Gate>)>,
    /// Lookups held at the gate (a reconciliation run caught mid-way), if asked for.
    hold_lookups: bool,
    lookups_waiting: VecDeque<(String, oneshot::Sender<()>)>,
    refunds: usize,
    next_reference: u64,
    /// Keys of the charges that will never answer (their process is taken as dead).
    hung: Vec<String>,
}

#[derive(Clone, Default)]
pub struct Scripted {
    books: Arc<Mutex<Books>>,
    changed: Arc<Notify>,
}

impl Scripted {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn provider(&self) -> Arc<dyn PaymentProvider> {
        Arc::new(self.clone())
    }

    fn books(&self) -> std::sync::MutexGuard<'_, Books> {
        self.books.lock().expect("books")
    }

    /// The behaviour of the next charges under `key` (the payment key, `jti:Idempotency-Key`).
    pub fn plan(&self, key: &str, charge: Charge) {
        self.books().plans.insert(key.to_owned(), charge);
    }

    /// Every charge the provider holds.
    pub fn charges(&self) -> HashMap<String, Booked> {
        self.books().charges.clone()
    }

    pub fn refunds(&self) -> usize {
        self.books().refunds
    }

    /// Keys of the charges that never answer.
    pub fn hung(&self) -> Vec<String> {
        self.books().hung.clone()
    }

    /// Keys of the charges waiting at the gate, oldest first.
    pub fn waiting(&self) -> Vec<String> {
        self.books()
            .waiting
            .iter()
            .map(|(k, _)| k.clone())
            .collect()
    }

    /// Waits until a charge of `key` waits at the gate (or `done` says its request ended).
    pub async fn until_waiting(&self, key: &str) {
        loop {
            let notified = self.changed.notified();
            if self.waiting().iter().any(|k| k == key) {
                return;
            }
            notified.await;
        }
    }

    /// Ends the oldest charge waiting at the gate; false if none waits.
    pub fn release_oldest(&self, how: Gate) -> bool {
        let next = self.books().waiting.pop_front();
        match next {
            Some((_, wake)) => {
                let _ = wake.send(how);
                true
            }
            None => false,
        }
    }

    /// Ends the charge of `key` waiting at the gate.
    pub fn release(&self, key: &str, how: Gate) {
        let mut books = self.books();
        let at = books
            .waiting
            .iter()
            .position(|(k, _)| k == key)
            .expect("a charge of that key waits");
        let (_, wake) = books.waiting.remove(at).expect("present");
        let _ = wake.send(how);
    }

    /// Holds every lookup at the gate until [`Scripted::release_lookups`].
    pub fn hold_lookups(&self) {
        self.books().hold_lookups = true;
    }

    pub async fn until_lookup_waits(&self) {
        loop {
            let notified = self.changed.notified();
            if !self.books().lookups_waiting.is_empty() {
                return;
            }
            notified.await;
        }
    }

    pub fn release_lookups(&self) {
        let mut books = self.books();
        books.hold_lookups = false;
        for (_, wake) in books.lookups_waiting.drain(..) {
            let _ = wake.send(());
        }
    }

    /// Records the charge of `key` (the first under a key decides) and returns its outcome.
    fn book(&self, key: &str, amount_cents: i64, token: &str) -> ChargeOutcome {
        let mut books = self.books();
        books.next_reference += 1;
        let reference = format!("ch_{}", books.next_reference);
        let booked = books
            .charges
            .entry(key.to_owned())
            .or_insert_with(|| Booked {
                reference,
                amount_cents,
                succeeded: token == purchase::payments::TOKEN_OK,
                refunded: false,
            })
            .clone();
        outcome(&booked)
    }
}

fn outcome(booked: &Booked) -> ChargeOutcome {
    if booked.succeeded {
        ChargeOutcome::Succeeded {
            reference: booked.reference.clone(),
        }
    } else {
        ChargeOutcome::Declined {
            code: "card_declined",
            message: "the card was declined".into(),
        }
    }
}

fn down(what: &str) -> PaymentError {
    PaymentError::Unavailable(what.into())
}

#[async_trait]
impl PaymentProvider for Scripted {
    fn name(&self) -> &'static str {
        "sandbox"
    }

    fn accepts(&self, token: &str) -> bool {
        purchase::payments::is_known_token(token)
    }

    async fn charge(
        &self,
        key: &str,
        amount_cents: i64,
        token: &str,
    ) -> Result<ChargeOutcome, PaymentError> {
        let plan = self
            .books()
            .plans
            .get(key)
            .copied()
            .unwrap_or(Charge::Answer);
        let how = match plan {
            Charge::Answer => Gate::Answer,
            Charge::Outage => Gate::Outage,
            Charge::Timeout => Gate::Timeout,
            Charge::DiesAfterCharging => Gate::DiesAfterCharging,
            Charge::Slow => {
                let (wake, woken) = oneshot::channel();
                self.books().waiting.push_back((key.to_owned(), wake));
                self.changed.notify_waiters();
                // A request dropped meanwhile never gets here again: like a caller gone away.
                woken.await.unwrap_or(Gate::Outage)
            }
        };
        let answer = match how {
            Gate::Answer => Ok(self.book(key, amount_cents, token)),
            Gate::Outage => Err(down("provider outage")),
            Gate::Timeout => {
                self.book(key, amount_cents, token);
                Err(down("provider timed out"))
            }
            Gate::DiesAfterCharging | Gate::Hang => {
                if how == Gate::DiesAfterCharging {
                    self.book(key, amount_cents, token);
                }
                self.books().hung.push(key.to_owned());
                self.changed.notify_waiters();
                std::future::pending().await
            }
        };
        self.changed.notify_waiters();
        answer
    }

    async fn lookup(&self, key: &str) -> Result<Option<ChargeOutcome>, PaymentError> {
        let held = {
            let mut books = self.books();
            if books.hold_lookups {
                let (wake, woken) = oneshot::channel();
                books.lookups_waiting.push_back((key.to_owned(), wake));
                Some(woken)
            } else {
                None
            }
        };
        if let Some(woken) = held {
            self.changed.notify_waiters();
            let _ = woken.await;
        }
        Ok(self.books().charges.get(key).map(outcome))
    }

    async fn refund(&self, reference: &str) -> Result<(), PaymentError> {
        let mut books = self.books();
        books.refunds += 1;
        let charge = books
            .charges
            .values_mut()
            .find(|c| c.reference == reference)
            .ok_or_else(|| down("no such charge"))?;
        charge.refunded = true;
        Ok(())
    }
}
