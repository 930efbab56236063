//! The lab's network emulator: two namespaces joined by TUN devices and a
//! forwarder. What it does to packets must be what the kernels on both
//! sides see: a round trip that takes the delay, retransmissions under
//! loss, silence under a cut, one flow dropped while the others flow.

mod support;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use pulsegate::lab::{Direction, Impairment, LinkedLab};
use pulsegate::sockopt;
use support::*;

fn far_echo(lab: &LinkedLab) -> pulsegate::lab::LabProcess {
    start_echo_backend_on(lab.far(), LinkedLab::far_addr(BACKEND_PORT), None)
}

fn round_trip(stream: &mut TcpStream) -> Duration {
    let started = Instant::now();
    exchange_line(stream);
    started.elapsed()
}

/// Sends a line that must go unanswered for a second (the link silences
/// it).
fn assert_silenced(stream: &mut TcpStream) {
    stream.write_all(b"ping\n").unwrap();
    let (end, _) = read_end(stream, Duration::from_secs(1));
    assert!(matches!(end, ReadEnd::Nothing), "{end:?}");
}

/// Once the link carries it again, the kernel's next retransmission (RTO
/// backoff: within a few seconds) delivers the line and its echo returns.
fn assert_echo_resumes(stream: &mut TcpStream) {
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let mut reply = [0u8; 5];
    stream
        .read_exact(&mut reply)
        .expect("the echo once restored");
    assert_eq!(&reply, b"ping\n");
}

fn median(mut samples: Vec<Duration>) -> Duration {
    samples.sort();
    samples[samples.len() / 2]
}

#[test]
fn delay_line_adds_its_delay_to_every_round_trip() {
    let Some(lab) = linked_lab_or_skip("link-delay") else {
        return;
    };
    let _backend = far_echo(&lab);
    let mut client = connect(lab.near(), LinkedLab::far_addr(BACKEND_PORT));
    client.set_nodelay(true).unwrap();
    let clean = median((0..10).map(|_| round_trip(&mut client)).collect());
    lab.link().set_both(Impairment::delay(
        Duration::from_millis(50),
        Duration::from_millis(5),
    ));
    // 30 round trips: the kernel smooths its RTT estimate over about eight.
    let delayed = median((0..30).map(|_| round_trip(&mut client)).collect());
    eprintln!("round trip: clean {clean:?}, 50 ms ± 5 ms each way {delayed:?}");
    assert!(clean < Duration::from_millis(20), "{clean:?}");
    assert!(
        (Duration::from_millis(90)..Duration::from_millis(150)).contains(&delayed),
        "{delayed:?}"
    );
    let rtt = sockopt::tcp_info(&client).unwrap().rtt_us;
    assert!(
        (80_000..200_000).contains(&rtt),
        "the kernel's RTT: {rtt} µs"
    );
}

#[test]
fn loss_makes_the_kernel_retransmit_and_bytes_still_arrive_intact() {
    let Some(lab) = linked_lab_or_skip("link-loss") else {
        return;
    };
    let _backend = far_echo(&lab);
    let client = connect(lab.near(), LinkedLab::far_addr(BACKEND_PORT));
    lab.link().set_both(Impairment::loss(0.05));
    let probe = client.try_clone().unwrap();
    let transfer = echo_transfer(client, 2 << 20, Duration::from_secs(20));
    assert_eq!(transfer.sent, transfer.received, "bytes changed on the way");
    let retrans = sockopt::tcp_info(&probe).unwrap().total_retrans;
    let dropped = lab.link().counters(Direction::ToFar).dropped
        + lab.link().counters(Direction::ToNear).dropped;
    eprintln!("2 MiB echoed at 5 % loss: {dropped} packets dropped, {retrans} retransmitted by the client's kernel");
    assert!(dropped > 20, "{dropped}");
    assert!(retrans > 0, "the kernel saw no loss");
}

#[test]
fn a_cut_silences_the_link_and_healing_it_resumes_the_same_connection() {
    let Some(lab) = linked_lab_or_skip("link-cut") else {
        return;
    };
    let _backend = far_echo(&lab);
    let mut client = connect(lab.near(), LinkedLab::far_addr(BACKEND_PORT));
    exchange_line(&mut client);
    lab.link().set_both(Impairment::cut());
    assert_silenced(&mut client);
    let info = sockopt::tcp_info(&client).unwrap();
    assert!(info.unacked > 0 && info.retransmits > 0, "{info:?}");
    lab.link().set_both(Impairment::none());
    assert_echo_resumes(&mut client);
}

#[test]
fn a_dropped_flow_goes_silent_while_others_to_the_same_host_flow() {
    let Some(lab) = linked_lab_or_skip("link-flow") else {
        return;
    };
    let _backend = far_echo(&lab);
    let mut victim = connect(lab.near(), LinkedLab::far_addr(BACKEND_PORT));
    let mut other = connect(lab.near(), LinkedLab::far_addr(BACKEND_PORT));
    exchange_line(&mut victim);
    lab.link()
        .drop_flow(victim.local_addr().unwrap(), victim.peer_addr().unwrap())
        .unwrap();
    assert_silenced(&mut victim);
    exchange_line(&mut other);
    lab.link().restore_flows();
    assert_echo_resumes(&mut victim);
}

#[test]
fn a_dropped_endpoint_goes_silent_one_way_or_both_while_another_port_flows() {
    let Some(lab) = linked_lab_or_skip("link-endpoint") else {
        return;
    };
    let _primary = far_echo(&lab);
    let secondary = LinkedLab::far_addr(BACKEND_PORT + 1);
    let _secondary = start_echo_backend_on(lab.far(), secondary, None);
    let primary = LinkedLab::far_addr(BACKEND_PORT);
    for directions in [&[Direction::ToFar][..], &Direction::BOTH] {
        let mut victim = connect(lab.near(), primary);
        let mut other = connect(lab.near(), secondary);
        exchange_line(&mut victim);
        let before = lab.link().counters(Direction::ToFar).dropped;
        lab.link().drop_endpoint(primary, directions).unwrap();
        assert_silenced(&mut victim);
        assert!(
            lab.link().counters(Direction::ToFar).dropped > before,
            "{directions:?}"
        );
        exchange_line(&mut other);
        lab.link().restore_endpoints();
        assert_echo_resumes(&mut victim);
    }
}

/// `loss 100` (every packet lost at random) is a blackhole: an open
/// connection hears nothing and a new one cannot be made, exactly as under
/// a cut; healing resumes the open connection.
#[test]
fn total_loss_is_a_blackhole() {
    let Some(lab) = linked_lab_or_skip("link-loss100") else {
        return;
    };
    let _backend = far_echo(&lab);
    let addr = LinkedLab::far_addr(BACKEND_PORT);
    let mut open = connect(lab.near(), addr);
    exchange_line(&mut open);
    lab.link().set_both(Impairment::loss(1.0));
    // Packets admitted before the change may still leave (the delayed ACK).
    std::thread::sleep(Duration::from_millis(100));
    let forwarded = lab.link().counters(Direction::ToFar).forwarded;
    assert_silenced(&mut open);
    let fresh = lab
        .near()
        .enter(|| std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2)))
        .unwrap();
    assert!(fresh.is_err(), "a connection was made through total loss");
    assert_eq!(
        lab.link().counters(Direction::ToFar).forwarded,
        forwarded,
        "a packet got through"
    );
    lab.link().set_both(Impairment::none());
    assert_echo_resumes(&mut open);
}

#[test]
fn the_far_side_has_a_second_host_behind_the_same_link() {
    let Some(lab) = linked_lab_or_skip("link-second") else {
        return;
    };
    let second = LinkedLab::far_second_addr(BACKEND_PORT);
    let _backend = start_echo_backend_on(lab.far(), second, None);
    let mut stream = connect(lab.near(), second);
    exchange_line(&mut stream);
    lab.link()
        .set_both(Impairment::delay(Duration::from_millis(50), Duration::ZERO));
    assert!(
        round_trip(&mut stream) >= Duration::from_millis(100),
        "not across the link"
    );
}
