//! Unit tests of the report math: recovery time, phases, percentiles and
//! the timeline, on hand-made records.

use super::*;
use crate::bench::workload::Failure;

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

fn rec(route: Route, client: u32, start: u64, latency: u64, outcome: Outcome) -> Record {
    Record {
        route,
        client,
        start: ms(start),
        latency: ms(latency),
        outcome,
        reused: true,
    }
}

/// Two clients through pulsegate, fault at 1000 ms: client 0 is reset and
/// served again at 2600 ms, client 1 at 1900 ms.
fn pulsegate_records() -> Vec<Record> {
    let p = Route::Pulsegate;
    vec![
        rec(p, 0, 0, 1, Outcome::Ok),
        rec(p, 1, 10, 1, Outcome::Ok),
        rec(p, 0, 990, 1500, Outcome::Failed(Failure::Reset)),
        rec(p, 1, 995, 900, Outcome::Failed(Failure::Reset)),
        rec(p, 1, 1895, 5, Outcome::Ok),
        rec(p, 0, 2510, 90, Outcome::Ok),
        rec(p, 0, 3000, 2, Outcome::Ok),
        rec(p, 1, 3000, 2, Outcome::Ok),
    ]
}

#[test]
fn served_again_waits_for_every_client() {
    let records = pulsegate_records();
    let refs: Vec<&Record> = records.iter().collect();
    let served = served_again(&refs, 2, ms(1000));
    assert_eq!(served.clients, 2);
    assert_eq!(served.all_at, Some(ms(2600)));
    // A third client that never got an answer: not served again.
    assert_eq!(served_again(&refs, 3, ms(1000)).all_at, None);
    assert_eq!(served_again(&refs, 3, ms(1000)).clients, 2);
}

#[test]
fn an_answer_to_a_request_started_before_the_fault_does_not_count() {
    let d = Route::Direct;
    let records = [
        rec(d, 0, 999, 10, Outcome::Ok),
        rec(d, 0, 1010, 5000, Outcome::Hung),
    ];
    let refs: Vec<&Record> = records.iter().collect();
    let served = served_again(&refs, 1, ms(1000));
    assert_eq!(
        served,
        ServedAgain {
            clients: 0,
            all_at: None
        }
    );
}

#[test]
fn a_client_answered_once_and_then_failing_is_not_served_again_until_it_recovers() {
    let d = Route::Direct;
    let records = [
        // Answered just after the fault, then its connection hangs...
        rec(d, 0, 1001, 5, Outcome::Ok),
        rec(d, 0, 1020, 5000, Outcome::Hung),
        // ...and a new one answers.
        rec(d, 0, 6030, 2, Outcome::Ok),
        // Writes refused every other request until the end: never.
        rec(d, 1, 1010, 1, Outcome::Ok),
        rec(d, 1, 1030, 1, Outcome::Failed(Failure::ReadOnly)),
        rec(d, 1, 1050, 1, Outcome::Ok),
        rec(d, 1, 1070, 1, Outcome::Failed(Failure::ReadOnly)),
    ];
    let refs: Vec<&Record> = records.iter().collect();
    let served = served_again(&refs, 2, ms(1000));
    assert_eq!(served.clients, 1);
    assert_eq!(served.all_at, None);
    let client0: Vec<&Record> = refs.iter().copied().filter(|r| r.client == 0).collect();
    assert_eq!(served_again(&client0, 1, ms(1000)).all_at, Some(ms(6032)));
}

#[test]
fn phases_go_by_end_before_the_fault_and_start_after_recovery() {
    let p = Route::Pulsegate;
    let (fault, recovered) = (ms(1000), ms(2600));
    assert_eq!(
        phase_of(&rec(p, 0, 0, 1, Outcome::Ok), fault, recovered),
        Phase::Before
    );
    // Started before the fault, ended after it: caught by it.
    let caught = rec(p, 0, 990, 1500, Outcome::Failed(Failure::Reset));
    assert_eq!(phase_of(&caught, fault, recovered), Phase::During);
    assert_eq!(
        phase_of(&rec(p, 1, 1895, 5, Outcome::Ok), fault, recovered),
        Phase::During
    );
    assert_eq!(
        phase_of(&rec(p, 0, 2600, 1, Outcome::Ok), fault, recovered),
        Phase::After
    );
}

#[test]
fn percentiles_of_a_phase() {
    let d = Route::Direct;
    // 1000 requests of 1..=1000 ms, plus one unfinished that is left out.
    let mut records: Vec<Record> = (1..=1000).map(|i| rec(d, 0, i, i, Outcome::Ok)).collect();
    records.push(rec(d, 0, 2000, 9000, Outcome::Unfinished));
    let stats = phase_stats(records.iter());
    assert_eq!(stats.requests, 1000);
    let near = |got: Option<f64>, want: f64| {
        let got = got.unwrap();
        assert!((got - want).abs() <= want * 0.002, "{got} vs {want}");
    };
    near(stats.p50_ms, 500.0);
    near(stats.p99_ms, 990.0);
    near(stats.p999_ms, 999.0);
    near(stats.max_ms, 1000.0);
    assert_eq!(phase_stats(std::iter::empty()), PhaseStats::default());
}

#[test]
fn hung_and_failed_requests_count_in_latency_and_totals() {
    let d = Route::Direct;
    let records = [
        rec(d, 0, 0, 2, Outcome::Ok),
        rec(d, 0, 10, 5000, Outcome::Hung),
        rec(d, 0, 5020, 1, Outcome::Failed(Failure::Refused)),
    ];
    let stats = phase_stats(records.iter());
    assert_eq!((stats.ok, stats.hung, stats.failed), (1, 1, 1));
    assert!(stats.max_ms.unwrap() >= 4995.0);
}

#[test]
fn route_report_puts_it_together() {
    let mut records = pulsegate_records();
    records.push(rec(Route::Direct, 0, 0, 1, Outcome::Ok));
    records.push(rec(Route::Direct, 0, 1001, 4000, Outcome::Hung));
    let pg = route_report(&records, Route::Pulsegate, 2, ms(1000), ms(4000));
    assert_eq!((pg.requests, pg.ok, pg.failed, pg.hung), (8, 6, 2, 0));
    assert_eq!(pg.failures.get("reset"), Some(&2));
    assert_eq!(pg.served_again_s, Some(1.6));
    assert_eq!(
        (pg.before.requests, pg.during.requests, pg.after.requests),
        (2, 4, 2)
    );
    let direct = route_report(&records, Route::Direct, 1, ms(1000), ms(4000));
    assert_eq!(direct.served_again_s, None);
    assert_eq!(direct.clients_served_again, 0);
    assert_eq!((direct.during.hung, direct.after.requests), (1, 0));
}

#[test]
fn timeline_buckets_latency_by_start_and_failures_by_end() {
    let mut records = pulsegate_records();
    records.push(rec(Route::Direct, 0, 1500, 2600, Outcome::Unfinished));
    let buckets = timeline(&records, ms(1000));
    let at = |route: &str, t: f64| {
        buckets
            .iter()
            .find(|b| b.route == route && b.t_s == t)
            .unwrap()
    };
    let first = at("pulsegate", 0.0);
    assert_eq!((first.ok, first.failed), (2, 0));
    assert_eq!(first.max_ms, Some(1500.0));
    // The resets were seen at 1.895 s and 2.49 s.
    assert_eq!(
        (at("pulsegate", 1.0).failed, at("pulsegate", 2.0).failed),
        (1, 1)
    );
    let direct = at("direct", 1.0);
    assert_eq!(
        (direct.unfinished, direct.p50_ms, direct.max_ms),
        (1, None, None)
    );
    assert_eq!(direct.waiting_ms, Some(2600.0));
    assert_eq!(buckets.len(), 5);
    assert!(csv(&records)
        .starts_with("route,client,start_s,latency_s,outcome\npulsegate,0,0.000000,0.001000,ok\n"));
}

#[test]
fn false_evictions_are_what_the_fault_does_not_explain() {
    let p = Route::Pulsegate;
    let mut fresh = rec(p, 2, 1200, 1, Outcome::Failed(Failure::Reset));
    fresh.reused = false;
    let records = [
        // Ended before the fault at 1000 ms: false whatever the fault.
        rec(p, 0, 500, 1, Outcome::Failed(Failure::Closed)),
        rec(p, 0, 1100, 1, Outcome::Failed(Failure::Reset)),
        rec(p, 1, 1200, 1, Outcome::Failed(Failure::Reset)),
        // A refused connect, a hang and a fresh connection's reset end no
        // live session.
        rec(p, 1, 1300, 1, Outcome::Failed(Failure::Refused)),
        rec(p, 1, 1400, 5000, Outcome::Hung),
        fresh,
        rec(Route::Direct, 0, 1100, 1, Outcome::Failed(Failure::Reset)),
    ];
    let fault = ms(1000);
    assert_eq!(false_evictions(&records, p, Expected::Nothing, fault), 3);
    assert_eq!(false_evictions(&records, p, Expected::OneFlow, fault), 2);
    assert_eq!(
        false_evictions(&records, p, Expected::PrimarySessions, fault),
        1
    );
    assert_eq!(records.iter().filter(|r| ended_a_session(r)).count(), 4);
}
