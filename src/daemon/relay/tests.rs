//! The relay between a stand-in kernel and stand-in servers: `SOCK_SEQPACKET` pairs keep
//! message boundaries as `/dev/fuse` does, so every path runs without FUSE.

use super::*;
use crate::daemon::wire::{FUSE_FORGET, FUSE_INIT, IN_HEADER_LEN};

const LOOKUP: u32 = 1;

fn request(opcode: u32, unique: u64, body: &[u8]) -> Vec<u8> {
    let mut m = vec![0u8; IN_HEADER_LEN];
    m[0..4].copy_from_slice(&((IN_HEADER_LEN + body.len()) as u32).to_ne_bytes());
    m[4..8].copy_from_slice(&opcode.to_ne_bytes());
    m[8..16].copy_from_slice(&unique.to_ne_bytes());
    m.extend_from_slice(body);
    m
}

fn reply(unique: u64, body: &[u8]) -> Vec<u8> {
    let mut m = wire::error_reply(unique, 0).to_vec();
    m.extend_from_slice(body);
    let len = m.len() as u32;
    m[0..4].copy_from_slice(&len.to_ne_bytes());
    m
}

fn put(fd: &OwnedFd, msg: &[u8]) {
    send(fd, msg).unwrap();
}

/// The next whole message on `fd` (blocking).
fn take(fd: &OwnedFd) -> Vec<u8> {
    let mut buf = vec![0u8; 1 << 16];
    let n = socket::recv(fd.as_raw_fd(), &mut buf, MsgFlags::empty()).unwrap();
    buf.truncate(n);
    buf
}

fn unique_of(msg: &[u8]) -> u64 {
    u64::from_ne_bytes(msg[8..16].try_into().unwrap())
}

/// A relay whose kernel side is the returned descriptor; `INIT` is unique 2.
fn relay() -> (Relay, OwnedFd) {
    let (k_relay, kernel) = channel().unwrap();
    let r = Relay::start(k_relay, request(FUSE_INIT, 2, b"init-args")).unwrap();
    (r, kernel)
}

#[tokio::test]
async fn a_new_server_gets_init_then_every_unanswered_request_and_each_is_answered_once() {
    let (r, kernel) = relay();
    let (ours, first) = channel().unwrap();
    let installed = r.install(ours).unwrap();
    assert_eq!(installed.replayed, 0);
    assert_eq!(take(&first), request(FUSE_INIT, 2, b"init-args"));
    put(&first, &reply(2, b"init-out"));
    assert_eq!(take(&kernel), reply(2, b"init-out"));

    // Two requests reach the server; it answers one and dies.
    put(&kernel, &request(LOOKUP, 10, b"a"));
    put(&kernel, &request(LOOKUP, 12, b"b"));
    assert_eq!(unique_of(&take(&first)), 10);
    assert_eq!(unique_of(&take(&first)), 12);
    put(&first, &reply(10, b"answer-a"));
    assert_eq!(take(&kernel), reply(10, b"answer-a"));
    drop(first);
    installed.drained.await.unwrap();
    r.detach();
    assert_eq!(r.waiting(), 1);

    // While no server runs, requests are recorded; a forget is not (nothing waits on it).
    put(&kernel, &request(FUSE_FORGET, 14, b"f"));
    put(&kernel, &request(LOOKUP, 16, b"c"));
    while r.waiting() < 2 {
        std::thread::yield_now();
    }

    let (ours, second) = channel().unwrap();
    let installed = r.install(ours).unwrap();
    assert_eq!(installed.replayed, 2);
    assert_eq!(take(&second), request(FUSE_INIT, 2, b"init-args"));
    let mut replayed = vec![take(&second), take(&second)];
    replayed.sort_by_key(|m| unique_of(m));
    assert_eq!(
        replayed,
        vec![request(LOOKUP, 12, b"b"), request(LOOKUP, 16, b"c")]
    );
    // Its INIT answer, a reply nobody waits for and a second answer are dropped: the first
    // message the kernel sees is the answer to 12.
    put(&second, &reply(2, b"init-out"));
    put(&second, &reply(999, b"stray"));
    put(&second, &reply(12, b"answer-b"));
    put(&second, &reply(12, b"answer-b-again"));
    put(&second, &reply(16, b"answer-c"));
    assert_eq!(take(&kernel), reply(12, b"answer-b"));
    assert_eq!(take(&kernel), reply(16, b"answer-c"));
    assert_eq!(r.waiting(), 0);

    // A new request goes straight to the installed server.
    put(&kernel, &request(LOOKUP, 18, b"d"));
    assert_eq!(take(&second), request(LOOKUP, 18, b"d"));
}

#[tokio::test]
async fn init_is_replayed_once_and_answered_by_the_first_server_that_lives() {
    let (r, kernel) = relay();
    let (ours, first) = channel().unwrap();
    let installed = r.install(ours).unwrap();
    assert_eq!(unique_of(&take(&first)), 2);
    drop(first);
    installed.drained.await.unwrap();
    r.detach();
    let (ours, second) = channel().unwrap();
    let installed = r.install(ours).unwrap();
    // Only INIT, once: it is not replayed a second time from the waiting requests.
    assert_eq!(installed.replayed, 0);
    assert_eq!(take(&second), request(FUSE_INIT, 2, b"init-args"));
    put(&second, &reply(2, b"init-out"));
    assert_eq!(take(&kernel), reply(2, b"init-out"));
}

#[tokio::test]
async fn giving_up_answers_every_waiting_and_later_request_with_the_error() {
    let (r, kernel) = relay();
    let (ours, server) = channel().unwrap();
    let _installed = r.install(ours).unwrap();
    assert_eq!(unique_of(&take(&server)), 2);
    put(&server, &reply(2, b""));
    take(&kernel);
    put(&kernel, &request(LOOKUP, 20, b"x"));
    assert_eq!(unique_of(&take(&server)), 20);
    assert_eq!(r.fail_pending(libc::EIO), 1);
    assert_eq!(take(&kernel), wire::error_reply(20, libc::EIO));
    put(&kernel, &request(LOOKUP, 22, b"y"));
    assert_eq!(take(&kernel), wire::error_reply(22, libc::EIO));
}

#[tokio::test]
async fn stopping_a_server_sends_one_destroy_per_thread_then_end_of_file() {
    let (r, _kernel) = relay();
    let (ours, server) = channel().unwrap();
    let _installed = r.install(ours).unwrap();
    take(&server);
    r.stop_server(3);
    for _ in 0..3 {
        let h = InHeader::parse(&take(&server)).unwrap();
        assert_eq!(h.opcode, wire::FUSE_DESTROY);
    }
    assert!(take(&server).is_empty());
}

#[tokio::test]
async fn the_end_of_the_kernel_connection_is_reported() {
    let (r, kernel) = relay();
    let mut ended = r.ended();
    drop(kernel);
    ended.wait_for(|e| *e).await.unwrap();
}

#[test]
fn a_first_request_that_is_not_init_is_refused() {
    let (k_relay, _kernel) = channel().unwrap();
    assert!(Relay::start(k_relay, request(LOOKUP, 2, b"")).is_err());
    let (k_relay, _kernel) = channel().unwrap();
    assert!(Relay::start(k_relay, vec![1, 2, 3]).is_err());
}
