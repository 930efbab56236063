//! The death rule over TCP_INFO samples, without sockets or sleeping.

use super::*;

fn rule() -> Rule {
    Rule {
        probe_ms: 1000,
        dead_after_ms: 1000,
        sweep_ms: 500,
        keepidle_ms: 5000,
    }
}

fn info(unacked: u32, probes: u8, last_ack_recv_ms: u32, last_data_ms: u32) -> TcpInfo {
    TcpInfo {
        state: TcpInfo::ESTABLISHED,
        unacked,
        probes,
        last_ack_recv_ms,
        last_data_recv_ms: last_data_ms,
        last_data_sent_ms: last_data_ms,
        ..TcpInfo::default()
    }
}

#[test]
fn quiet_leg_is_armed_then_stays_alive_while_probes_are_answered() {
    let mut leg = LegState::default();
    let a = leg.assess(&info(0, 0, 4000, 4000), 10_000, 0, &rule());
    assert_eq!(a.action, Action::Arm);
    assert_eq!(a.dead, None);
    // The probe was answered 2 ms after arming; nothing owed.
    for t in (10_500..30_000).step_by(500) {
        let since_answer = ((t - 10_002) % 1000) as u32;
        let a = leg.assess(&info(0, 0, since_answer, 20_000), t, 0, &rule());
        assert_eq!(a.dead, None, "t={t}");
        assert_eq!(a.action, Action::None, "t={t}");
    }
}

#[test]
fn unanswered_probe_is_dead_after_dead_after_and_not_before() {
    let mut leg = LegState::default();
    leg.assess(&info(0, 0, 4000, 4000), 10_000, 0, &rule());
    // Probe left at 10_000; the peer is gone. At 10_600 one probe is out.
    let a = leg.assess(&info(0, 1, 4600, 4600), 10_600, 0, &rule());
    assert_eq!(a.dead, None);
    let a = leg.assess(&info(0, 2, 5000, 5000), 11_000, 0, &rule());
    assert_eq!(a.dead, Some(EvictReason::ProbeUnanswered));
}

#[test]
fn probe_after_answered_one_is_timed_from_its_own_departure() {
    let mut leg = LegState::default();
    leg.assess(&info(0, 0, 4000, 4000), 10_000, 0, &rule());
    // Last probe answered at 10_000; next left at 11_000 unanswered.
    // At 11_500 the last ACK is 1.5 s old but the debt is only 0.5 s old.
    let a = leg.assess(&info(0, 1, 1500, 5500), 11_500, 0, &rule());
    assert_eq!(a.dead, None);
    let a = leg.assess(&info(0, 2, 2000, 6000), 12_000, 0, &rule());
    assert_eq!(a.dead, Some(EvictReason::ProbeUnanswered));
}

#[test]
fn write_after_long_idle_is_not_mistaken_for_silence() {
    let mut leg = LegState::default();
    // Idle 60 s, the relay just wrote at 70_000: last ACK is 60 s old.
    let a = leg.assess(&info(1, 0, 60_000, 0), 70_001, 70_000, &rule());
    assert_eq!(a.dead, None);
    // The ACK arrived: nothing owed.
    let a = leg.assess(&info(0, 0, 1, 1), 70_500, 70_000, &rule());
    assert_eq!(a.dead, None);
    assert!(a.clear_pending);
}

#[test]
fn data_unacked_for_dead_after_is_dead() {
    let mut leg = LegState::default();
    let a = leg.assess(&info(1, 0, 9000, 9000), 10_300, 10_000, &rule());
    assert_eq!(a.dead, None);
    let a = leg.assess(&info(1, 0, 9800, 9800), 10_800, 10_000, &rule());
    assert_eq!(a.dead, None);
    let a = leg.assess(&info(1, 0, 10_000, 10_000), 11_000, 10_000, &rule());
    assert_eq!(a.dead, Some(EvictReason::RetransmitUnanswered));
}

#[test]
fn streaming_peer_that_keeps_acking_is_alive_forever() {
    let mut leg = LegState::default();
    for t in (10_000..100_000).step_by(500) {
        let sample = TcpInfo {
            bytes_acked: t * 1000,
            ..info(40, 0, 3, 0)
        };
        let a = leg.assess(&sample, t, 10_000, &rule());
        assert_eq!(a.dead, None);
    }
}

#[test]
fn one_way_partition_is_dead_although_the_peer_keeps_sending() {
    // Our segments no longer reach the peer; its own retransmissions still
    // reach us, so an ACK arrives every few hundred ms (last_ack_recv stays
    // small) but it acknowledges nothing new: bytes_acked stands still.
    let mut leg = LegState::default();
    let sample = |ack_ago| TcpInfo {
        bytes_acked: 5000,
        ..info(2, 0, ack_ago, 300)
    };
    assert_eq!(leg.assess(&sample(100), 10_000, 10_000, &rule()).dead, None);
    assert_eq!(leg.assess(&sample(200), 10_500, 10_000, &rule()).dead, None);
    let a = leg.assess(&sample(150), 11_000, 10_000, &rule());
    assert_eq!(a.dead, Some(EvictReason::RetransmitUnanswered));
    assert_eq!(a.silent_ms, 1_000);
}

#[test]
fn slow_reader_answering_window_probes_is_alive() {
    let mut leg = LegState::default();
    for (k, t) in (10_000..60_000u64).step_by(500).enumerate() {
        // Zero window: bytes queued, a window probe out at some samples,
        // answers up to 0.86 s apart (rate-limited by the receiver).
        let probes = (k % 2) as u8;
        let sample = TcpInfo {
            notsent_bytes: 65536,
            ..info(0, probes, 860, 20_000)
        };
        assert_eq!(leg.assess(&sample, t, 0, &rule()).dead, None, "t={t}");
    }
}

#[test]
fn zero_window_peer_that_vanished_is_dead_once_two_probes_are_out() {
    let mut leg = LegState::default();
    let sample = |probes, ack| TcpInfo {
        notsent_bytes: 65536,
        ..info(0, probes, ack, 20_000)
    };
    assert_eq!(leg.assess(&sample(1, 400), 10_000, 0, &rule()).dead, None);
    assert_eq!(leg.assess(&sample(1, 1400), 11_000, 0, &rule()).dead, None);
    assert_eq!(
        leg.assess(&sample(2, 1900), 11_500, 0, &rule()).dead,
        Some(EvictReason::ProbeUnanswered)
    );
}

#[test]
fn traffic_resuming_restores_the_configured_keepalive() {
    let mut leg = LegState::default();
    assert_eq!(
        leg.assess(&info(0, 0, 4000, 4000), 10_000, 0, &rule())
            .action,
        Action::Arm
    );
    assert_eq!(
        leg.assess(&info(0, 0, 5, 5), 12_000, 0, &rule()).action,
        Action::Restore
    );
}

#[test]
fn quiet_leg_is_not_sampled_before_a_death_could_be_declared() {
    let mut leg = LegState::default();
    leg.assess(&info(0, 0, 4000, 4000), 10_000, 0, &rule());
    // Probe answered at 10_002; next probe at ~11_002; earliest death 12_002.
    leg.assess(&info(0, 0, 498, 4500), 10_500, 0, &rule());
    assert!(!leg.due(11_900));
    assert!(leg.due(12_002));
}

#[test]
fn a_deadline_a_few_ms_after_a_visit_is_not_put_off_a_whole_sweep() {
    // Seen on a real run: silence 996 ms at a visit, next visit 499 ms later
    // was "not due" by 1 ms, so the eviction came a full second late.
    let mut leg = LegState::default();
    let a = leg.assess(&info(1, 0, 996, 996), 11_000, 10_004, &rule());
    assert_eq!(a.dead, Some(EvictReason::RetransmitUnanswered));
    let mut leg = LegState {
        next_check_ms: 3884,
        ..LegState::default()
    };
    assert!(leg.due(3883));
    leg.next_check_ms = 4000;
    assert!(!leg.due(3883));
}

#[test]
fn one_lost_keepalive_probe_does_not_evict() {
    let mut leg = LegState::default();
    leg.assess(&info(0, 0, 4000, 4000), 10_000, 0, &rule());
    // The probe that left at 10_000 was dropped; its retry leaves at 11_000.
    let a = leg.assess(&info(0, 1, 5400, 5400), 10_900, 0, &rule());
    assert_eq!(a.dead, None);
    let a = leg.assess(&info(0, 1, 5500, 5500), 11_000, 0, &rule());
    assert_eq!(
        a.dead, None,
        "silent for dead_after, but only one probe out"
    );
    // The retry was answered.
    let a = leg.assess(&info(0, 0, 2, 6000), 11_500, 0, &rule());
    assert_eq!(a.dead, None);
}
