//! The catalog, event updates and general admission, through the real service and Postgres.

use chrono::{Duration, Utc};
use serde_json::{json, Value};
use shared::testing::TestEnv;
use shared::token::{Signer, SigningKey};

use crate::{assert_never_oversold, in_process, pass, ORGANIZER};

pub(crate) fn event_body(name: &str, city: &str, category: &str, days: i64, price: i64) -> Value {
    let now = Utc::now();
    json!({
        "name": name, "city": city, "category": category, "venue": "Hall",
        "description": format!("{name}: a night of {category} in {city}"),
        "starts_at": now + Duration::days(days),
        "sale": {
            "presale_opens_at": now - Duration::hours(2),
            "sale_starts_at": now - Duration::hours(1),
            "sale_ends_at": now + Duration::hours(3),
            "rate_per_minute": 60, "max_active": 10
        },
        "seat_map": { "sections": [
            { "name": "A", "rows": 1, "seats_per_row": 2, "price_cents": price },
            { "name": "B", "rows": 1, "seats_per_row": 2, "price_cents": price * 2 }
        ] }
    })
}

pub(crate) async fn create(http: &reqwest::Client, url: &str, body: &Value) -> Value {
    let response = http
        .post(format!("{url}/api/v1/organizer/events"))
        .bearer_auth(ORGANIZER)
        .json(body)
        .send()
        .await
        .expect("request");
    assert_eq!(response.status(), 201, "{:?}", response.text().await);
    response.json().await.expect("json")
}

async fn search(http: &reqwest::Client, url: &str, query: &str) -> (u16, Value) {
    let response = http
        .get(format!("{url}/api/v1/events?{query}"))
        .send()
        .await
        .expect("request");
    let status = response.status().as_u16();
    (status, response.json().await.expect("json"))
}

fn names(found: &Value) -> Vec<String> {
    found["events"]
        .as_array()
        .expect("events")
        .iter()
        .map(|e| e["name"].as_str().expect("name").to_owned())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_catalog_searches_and_filters_upcoming_events() {
    let env = TestEnv::new().await;
    let signer = Signer::new(SigningKey::generate().expect("key"), "fairgate");
    let app = in_process(&env, &signer, |_| {}).await;
    let url = app.url();
    let http = reqwest::Client::new();
    create(
        &http,
        &url,
        &event_body("Blue Note Jazz Nights", "Lyon", "Jazz", 10, 3000),
    )
    .await;
    create(
        &http,
        &url,
        &event_body("Metal Mayhem", "Berlin", "Rock", 20, 6000),
    )
    .await;
    create(
        &http,
        &url,
        &event_body("Symphony No. 9", "Berlin", "Classical", 40, 9000),
    )
    .await;
    let mut past = event_body("Yesterday's Jazz", "Lyon", "Jazz", 1, 1000);
    past["starts_at"] = json!(Utc::now() + Duration::seconds(1));
    create(&http, &url, &past).await;
    tokio::time::sleep(std::time::Duration::from_millis(1200)).await;

    let (status, all) = search(&http, &url, "").await;
    assert_eq!(status, 200);
    assert_eq!(
        names(&all),
        ["Blue Note Jazz Nights", "Metal Mayhem", "Symphony No. 9"],
        "upcoming events, soonest first; the started one is gone"
    );
    assert_eq!(all["events"][0]["min_price_cents"], 3000);
    assert_eq!(all["events"][0]["max_price_cents"], 6000);

    // Full-text: stemmed words over name, description, venue, city and category.
    assert_eq!(
        names(&search(&http, &url, "q=jazz").await.1),
        ["Blue Note Jazz Nights"]
    );
    assert_eq!(
        names(&search(&http, &url, "q=nights%20lyon").await.1),
        ["Blue Note Jazz Nights"]
    );
    assert_eq!(
        names(&search(&http, &url, "q=symphonies").await.1),
        ["Symphony No. 9"]
    );
    assert_eq!(
        names(&search(&http, &url, "q=berlin%20-rock").await.1),
        ["Symphony No. 9"]
    );
    assert!(names(&search(&http, &url, "q=opera").await.1).is_empty());

    // Filters, combined.
    assert_eq!(
        names(&search(&http, &url, "city=berlin&category=ROCK").await.1),
        ["Metal Mayhem"]
    );
    let to = (Utc::now() + Duration::days(30))
        .to_rfc3339()
        .replace('+', "%2B");
    assert_eq!(
        names(&search(&http, &url, &format!("to={to}")).await.1),
        ["Blue Note Jazz Nights", "Metal Mayhem"]
    );
    // Price ranges overlap the event's: from 10,000 meets Rock (6,000–12,000) and Classical
    // (9,000–18,000); 7,000–8,000 only Rock.
    assert_eq!(
        names(&search(&http, &url, "min_price_cents=10000").await.1),
        ["Metal Mayhem", "Symphony No. 9"]
    );
    assert_eq!(
        names(
            &search(&http, &url, "min_price_cents=7000&max_price_cents=8000")
                .await
                .1
        ),
        ["Metal Mayhem"]
    );
    assert_eq!(
        names(&search(&http, &url, "max_price_cents=5000").await.1),
        ["Blue Note Jazz Nights"]
    );

    // Pages.
    let (_, first) = search(&http, &url, "limit=2").await;
    assert_eq!(first["next_offset"], 2);
    let (_, second) = search(&http, &url, "limit=2&offset=2").await;
    assert_eq!(names(&second), ["Symphony No. 9"]);
    assert_eq!(second["next_offset"], Value::Null);

    // Bad input: a precise 4xx.
    for bad in [
        "limit=0",
        "limit=101",
        "offset=-1",
        "min_price_cents=-5",
        "min_price_cents=10&max_price_cents=5",
        "from=2030-01-02T00:00:00Z&to=2030-01-01T00:00:00Z",
        "from=yesterday",
        "colour=red",
    ] {
        let (status, error) = search(&http, &url, bad).await;
        assert!(matches!(status, 400 | 422), "{bad}: {status} {error}");
        assert!(error["error"].is_string(), "{bad}: {error}");
    }
    let long = "x".repeat(201);
    assert_eq!(search(&http, &url, &format!("q={long}")).await.0, 422);

    app.stop().await.expect("stop");
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn organizers_update_details_and_the_map_but_never_remove_what_is_sold() {
    let env = TestEnv::new().await;
    let pg = env.pool().await;
    let signer = Signer::new(SigningKey::generate().expect("key"), "fairgate");
    let app = in_process(&env, &signer, |_| {}).await;
    let url = app.url();
    let http = reqwest::Client::new();
    let created = create(&http, &url, &event_body("Draft", "Oslo", "Pop", 10, 1000)).await;
    let event = created["id"].as_i64().expect("id");
    let patch = |body: Value| {
        let http = http.clone();
        let url = url.clone();
        async move {
            let response = http
                .patch(format!("{url}/api/v1/organizer/events/{event}"))
                .bearer_auth(ORGANIZER)
                .json(&body)
                .send()
                .await
                .expect("request");
            let status = response.status().as_u16();
            (status, response.json::<Value>().await.expect("json"))
        }
    };

    let anonymous = http
        .patch(format!("{url}/api/v1/organizer/events/{event}"))
        .json(&json!({ "name": "Hijacked" }))
        .send()
        .await
        .expect("request");
    assert_eq!(anonymous.status(), 401);

    let (status, page) = patch(json!({
        "name": "Final Name", "city": "Bergen",
        "add_ticket_types": [{ "name": "Standing", "capacity": 50, "price_cents": 500 }]
    }))
    .await;
    assert_eq!(status, 200, "{page}");
    assert_eq!(page["name"], "Final Name");
    assert_eq!(page["city"], "Bergen");
    assert_eq!(page["category"], "Pop", "untouched fields stay");
    assert_eq!(page["seats_total"], 54);
    assert_eq!(page["min_price_cents"], 500);
    let standing = page["tiers"]
        .as_array()
        .expect("tiers")
        .iter()
        .find(|t| t["name"] == "Standing")
        .expect("the new tier")
        .clone();
    assert_eq!(standing["admission"], "general");
    assert_eq!(standing["available"], 50);

    // Sell a seat of section A by hand; A can no longer leave the map, B can.
    sqlx::query(
        "UPDATE seats SET status = 'sold' WHERE id = (
             SELECT min(id) FROM seats WHERE event_id = $1 AND section = 'A')",
    )
    .bind(event)
    .execute(&pg)
    .await
    .expect("sell");
    let (status, error) = patch(json!({ "remove": ["A"] })).await;
    assert_eq!(
        (status, error["error"].as_str()),
        (409, Some("places_in_use"))
    );
    for bad in [
        json!({ "remove": ["Z"] }),
        json!({ "add_sections": [{ "name": "A", "rows": 1, "seats_per_row": 1, "price_cents": 1 }] }),
        json!({ "add_ticket_types": [{ "name": "Pit", "capacity": 0, "price_cents": 1 }] }),
        json!({ "add_ticket_types": [{ "name": "Pit", "capacity": 300000, "price_cents": 1 }] }),
        json!({ "name": "" }),
        json!({ "starts_at": Utc::now() - Duration::days(1) }),
        json!({ "colour": "red" }),
    ] {
        let (status, error) = patch(bad.clone()).await;
        assert!(matches!(status, 400 | 422), "{bad}: {status} {error}");
    }
    let (status, page) = patch(json!({ "remove": ["B"] })).await;
    assert_eq!(status, 200, "{page}");
    assert_eq!(page["seats_total"], 52);
    let sections: Vec<String> = sqlx::query_scalar(
        "SELECT DISTINCT section FROM seats WHERE event_id = $1 ORDER BY section",
    )
    .bind(event)
    .fetch_all(&pg)
    .await
    .expect("sections");
    assert_eq!(
        sections,
        ["A", "Standing"],
        "nothing else changed on refusals"
    );

    // A sold-out event reopens when places are added.
    sqlx::query("UPDATE events SET sold_out_at = now() WHERE id = $1")
        .bind(event)
        .execute(&pg)
        .await
        .expect("sold out");
    let (status, page) = patch(json!({
        "add_sections": [{ "name": "C", "rows": 2, "seats_per_row": 5, "price_cents": 800 }]
    }))
    .await;
    assert_eq!(status, 200, "{page}");
    assert_eq!(page["sold_out_at"], Value::Null);

    // A place sold and refunded is available again, but its void ticket still names it: the
    // section cannot leave the map (tickets have no foreign key to their seat since 0021).
    sqlx::query(
        "WITH seat AS (SELECT min(id) AS id FROM seats WHERE event_id = $1 AND section = 'C'),
              hold AS (INSERT INTO holds (id, event_id, jti, seat_ids, expires_at, status)
                       SELECT gen_random_uuid(), $1, gen_random_uuid(), ARRAY[seat.id], now(),
                              'purchased' FROM seat RETURNING id, jti),
              sale AS (INSERT INTO orders (id, event_id, jti, identity, hold_id, total_cents,
                                           status, payment_ref, refunded_at, refunded_by)
                       SELECT gen_random_uuid(), $1, hold.jti, 'site:fan', hold.id, 800,
                              'refunded', 'ref', now(), 'support' FROM hold RETURNING id)
         INSERT INTO tickets (code, order_id, seat_id, status)
         SELECT 'FG-VOID-TEST', sale.id, seat.id, 'void' FROM sale, seat",
    )
    .bind(event)
    .execute(&pg)
    .await
    .expect("a refunded sale");
    let (status, error) = patch(json!({ "remove": ["C"] })).await;
    assert_eq!(
        (status, error["error"].as_str()),
        (409, Some("places_in_use")),
        "{error}"
    );
    let orphans: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM tickets t WHERE NOT EXISTS (SELECT 1 FROM seats s WHERE s.id = t.seat_id)",
    )
    .fetch_one(&pg)
    .await
    .expect("orphans");
    assert_eq!(orphans, 0, "every ticket still names a seat");

    app.stop().await.expect("stop");
    pg.close().await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn general_admission_by_quantity_never_oversells() {
    let env = TestEnv::new().await;
    let pg = env.pool().await;
    let signer = Signer::new(SigningKey::generate().expect("key"), "fairgate");
    let app = in_process(&env, &signer, |_| {}).await;
    let url = app.url();
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(300)
        .build()
        .expect("client");
    let mut body = event_body("Festival", "Gent", "Festival", 10, 2000);
    body["ticket_types"] = json!([{ "name": "Field", "capacity": 25, "price_cents": 4500 }]);
    let event = create(&http, &url, &body).await["id"].as_i64().expect("id");

    let probe = pass(&signer, event);
    let hold = |body: Value, pass: String| {
        let (http, url) = (http.clone(), url.clone());
        async move {
            let response = http
                .post(format!("{url}/api/v1/events/{event}/holds"))
                .bearer_auth(pass)
                .json(&body)
                .send()
                .await
                .expect("hold");
            let status = response.status().as_u16();
            (status, response.json::<Value>().await.expect("json"))
        }
    };
    // The seat map lists seats, not the field's 25 places.
    let seats: Vec<Value> = crate::seat_map(&http, &url, event, &probe).await;
    assert_eq!(seats.len(), 4);
    // Bad requests change nothing.
    let field_unit: i64 = sqlx::query_scalar(
        "SELECT min(id) FROM seats WHERE event_id = $1 AND admission = 'general'",
    )
    .bind(event)
    .fetch_one(&pg)
    .await
    .expect("unit");
    for (body, status, code) in [
        (
            json!({ "ticket_type": "Field", "quantity": 3 }),
            422,
            "invalid_field",
        ),
        (
            json!({ "ticket_type": "Field", "quantity": 0 }),
            422,
            "invalid_field",
        ),
        (
            json!({ "ticket_type": "Field", "quantity": -1 }),
            422,
            "invalid_field",
        ),
        (
            json!({ "ticket_type": "Field", "quantity": 1e12 }),
            422,
            "invalid_body",
        ),
        (json!({ "ticket_type": "Field" }), 422, "invalid_field"),
        (
            json!({ "ticket_type": "Field", "quantity": 1, "seat_ids": [1] }),
            422,
            "invalid_field",
        ),
        (
            json!({ "ticket_type": "Balcony", "quantity": 1 }),
            404,
            "ticket_type_not_found",
        ),
        (json!({ "seat_ids": [field_unit] }), 422, "invalid_field"),
    ] {
        let (got, error) = hold(body.clone(), probe.clone()).await;
        assert_eq!(
            (got, error["error"].as_str()),
            (status, Some(code)),
            "{body}: {error}"
        );
    }
    let held: i64 = sqlx::query_scalar("SELECT count(*) FROM holds")
        .fetch_one(&pg)
        .await
        .expect("holds");
    assert_eq!(held, 0);

    // 120 fans at once want one or two field places (25 exist), then pay.
    let outcomes = futures::future::join_all((0..120).map(|i| {
        let (http, url) = (http.clone(), url.clone());
        let fan = pass(&signer, event);
        async move {
            let quantity = 1 + i % 2;
            let (status, held) = hold(
                json!({ "ticket_type": "Field", "quantity": quantity }),
                fan.clone(),
            )
            .await;
            match status {
                201 => {}
                409 => {
                    assert_eq!(held["error"], "not_enough_places", "{held}");
                    return 0;
                }
                other => panic!("hold answered {other}: {held}"),
            }
            assert_eq!(
                held["seat_ids"].as_array().expect("ids").len() as i64,
                quantity
            );
            let paid = http
                .post(format!("{url}/api/v1/events/{event}/checkout"))
                .bearer_auth(&fan)
                .header("Idempotency-Key", format!("ga-{i}"))
                .json(&json!({ "hold_id": held["hold_id"], "payment_token": "tok_visa" }))
                .send()
                .await
                .expect("checkout");
            assert_eq!(paid.status(), 201, "{:?}", paid.text().await);
            quantity
        }
    }))
    .await;
    let bought: i64 = outcomes.iter().sum();
    assert!(
        (1..=25).contains(&bought),
        "the field sold {bought} of 25 places"
    );
    let sold: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM seats WHERE event_id = $1 AND admission = 'general' AND status = 'sold'",
    )
    .bind(event)
    .fetch_one(&pg)
    .await
    .expect("sold");
    assert_eq!(sold, bought, "every place bought is sold, once");
    assert_never_oversold(&pg, event).await;
    let page: Value = http
        .get(format!("{url}/api/v1/events/{event}"))
        .send()
        .await
        .expect("page")
        .json()
        .await
        .expect("json");
    let field = page["tiers"]
        .as_array()
        .expect("tiers")
        .iter()
        .find(|t| t["name"] == "Field")
        .expect("field tier")
        .clone();
    assert_eq!(field["sold"], bought);
    assert_eq!(field["available"], 25 - bought);

    app.stop().await.expect("stop");
    pg.close().await;
    env.cleanup().await;
}
