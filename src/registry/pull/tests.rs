//! Fallback and whole streams against small in-process HTTP hosts, each answering blob and
//! manifest requests its own way and counting the GETs it gets.

use super::ranges::Ranges;
use super::*;
use std::io::{Read, Write};
use std::net::TcpListener;
use std::sync::atomic::AtomicUsize;

/// How a test host answers.
#[derive(Clone)]
enum Mode {
    /// As a registry: ranges with 206, manifests by tag or digest.
    Ranges,
    /// Every blob GET with 200 and the whole blob, sent slowly (a cold pull-through cache).
    Whole,
    /// Whole, but with every byte flipped (same size, no digest header).
    Corrupt,
    /// A pull-through cache storing the blob: its first `n` blob GETs get 200 with the whole
    /// blob (sent slowly, named by its digest), later ones ranges.
    Stores(usize),
    /// 404 for everything.
    Missing,
    /// 503 for everything.
    Broken,
    /// Another blob's bytes, with that blob's digest and length.
    Other(Bytes),
    /// 400 for manifests, saying it is a registry (a reference it finds malformed).
    Refuses,
}

struct TestHost {
    addr: String,
    /// Connections accepted.
    conns: Arc<AtomicUsize>,
    gets: Arc<AtomicUsize>,
    /// GETs of manifests by tag.
    tags: Arc<AtomicUsize>,
}

fn serve(mode: Mode, blob: Bytes, digest: String, manifest: Bytes) -> TestHost {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let (gets, tags) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let conns = Arc::new(AtomicUsize::new(0));
    let (g, t, c) = (gets.clone(), tags.clone(), conns.clone());
    std::thread::spawn(move || {
        for conn in listener.incoming().flatten() {
            c.fetch_add(1, Ordering::SeqCst);
            let (mode, blob, digest, manifest) =
                (mode.clone(), blob.clone(), digest.clone(), manifest.clone());
            let (g, t) = (g.clone(), t.clone());
            std::thread::spawn(move || {
                let _ = answer(conn, &mode, &blob, &digest, &manifest, &g, &t);
            });
        }
    });
    TestHost {
        addr,
        conns,
        gets,
        tags,
    }
}

fn answer(
    mut conn: std::net::TcpStream,
    mode: &Mode,
    blob: &Bytes,
    digest: &str,
    manifest: &Bytes,
    gets: &AtomicUsize,
    tags: &AtomicUsize,
) -> std::io::Result<()> {
    loop {
        let mut head = Vec::new();
        let mut b = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            if conn.read(&mut b)? == 0 {
                return Ok(());
            }
            head.push(b[0]);
        }
        let head = String::from_utf8_lossy(&head).to_string();
        let target = head.split(' ').nth(1).unwrap_or("").to_string();
        let range = head
            .lines()
            .find_map(|l| {
                l.to_ascii_lowercase()
                    .strip_prefix("range: bytes=")
                    .map(str::to_string)
            })
            .and_then(|r| {
                let (a, b) = r.trim().split_once('-')?;
                Some((a.parse::<usize>().ok()?, b.parse::<usize>().ok()?))
            });
        let nth = gets.fetch_add(1, Ordering::SeqCst);
        let mut out = |status: &str, headers: &[(&str, String)], body: &[u8]| {
            let mut h = format!("HTTP/1.1 {status}\r\nContent-Length: {}\r\n", body.len());
            for (k, v) in headers {
                h += &format!("{k}: {v}\r\n");
            }
            h += "\r\n";
            conn.write_all(h.as_bytes())?;
            conn.write_all(body)
        };
        let dcd = ("Docker-Content-Digest", digest.to_string());
        if target == "/v2/" {
            out("200 OK", &[], b"{}")?;
            continue;
        }
        if target.contains("/manifests/") {
            if !target.contains("/manifests/sha256:") {
                tags.fetch_add(1, Ordering::SeqCst);
            }
            match mode {
                Mode::Missing => out("404 Not Found", &[], b"")?,
                Mode::Broken => out("503 Service Unavailable", &[], b"")?,
                Mode::Refuses => out(
                    "400 Bad Request",
                    &[("Docker-Distribution-Api-Version", "registry/2.0".into())],
                    br#"{"errors":[{"code":"TAG_INVALID"}]}"#,
                )?,
                _ => out(
                    "200 OK",
                    &[(
                        "Content-Type",
                        "application/vnd.oci.image.manifest.v1+json".into(),
                    )],
                    manifest,
                )?,
            }
            continue;
        }
        match mode {
            Mode::Missing | Mode::Refuses => out("404 Not Found", &[], b"")?,
            Mode::Broken => out("503 Service Unavailable", &[], b"")?,
            Mode::Other(other) => {
                let d = crate::digest::sha256(other);
                out("200 OK", &[("Docker-Content-Digest", d)], other)?
            }
            Mode::Stores(n) if nth < *n => {
                let h = format!(
                    "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nDocker-Content-Digest: {digest}\r\n\r\n",
                    blob.len()
                );
                conn.write_all(h.as_bytes())?;
                for piece in blob.chunks(16 << 10) {
                    std::thread::sleep(Duration::from_millis(5));
                    conn.write_all(piece)?;
                }
            }
            Mode::Ranges | Mode::Stores(_) => match range {
                Some((a, b)) => {
                    let cr = format!("bytes {a}-{b}/{}", blob.len());
                    out(
                        "206 Partial Content",
                        &[("Content-Range", cr), dcd],
                        &blob[a..=b],
                    )?
                }
                None => out("200 OK", &[dcd], blob)?,
            },
            Mode::Whole | Mode::Corrupt => {
                let body: Vec<u8> = match mode {
                    Mode::Corrupt => blob.iter().map(|x| !x).collect(),
                    _ => blob.to_vec(),
                };
                let h = format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n", body.len());
                conn.write_all(h.as_bytes())?;
                for piece in body.chunks(16 << 10) {
                    std::thread::sleep(Duration::from_millis(5));
                    conn.write_all(piece)?;
                }
            }
        }
    }
}

fn blob() -> (Bytes, String) {
    let data: Vec<u8> = (0..300_000u32).map(|i| (i * 7 % 251) as u8).collect();
    let d = crate::digest::sha256(&data);
    (Bytes::from(data), d)
}

fn route(addr: &str, caps: Capabilities, mirror: bool) -> Route {
    Route {
        endpoint: Endpoint::parse(&format!("http://{addr}"), false, false).unwrap(),
        repo: "t/app".into(),
        caps,
        mirror,
        namespace: None,
    }
}

fn spool_dir(tag: &str) -> PathBuf {
    std::env::temp_dir().join(format!("ocifs-pull-{tag}-{}", std::process::id()))
}

fn repo(routes: &[Route], tag: &str) -> Arc<Repo> {
    repo_waiting(routes, tag, Duration::ZERO)
}

/// [`repo`] waiting up to `fill_wait` for a host to store a blob it answers whole.
fn repo_waiting(routes: &[Route], tag: &str, fill_wait: Duration) -> Arc<Repo> {
    let opts = RepoOptions {
        spool_dir: Some(spool_dir(tag)),
        fill_wait,
        ..Default::default()
    };
    Repo::connect("r.example/t/app", routes, &|_| Ok(None), opts).unwrap()
}

/// Five reads of `b` at once and one after, each checked against `data`.
async fn read_all_over(b: &Arc<RepoBlob>, data: &Bytes) {
    let reads = [
        (0u64, 100u64),
        (250_000, 5000),
        (299_000, 1000),
        (40_000, 70_000),
        (10, 1),
    ];
    let tasks = reads.map(|(off, len)| {
        let b = b.clone();
        tokio::spawn(async move { (off, len, b.read_at(off, len).await.unwrap()) })
    });
    for t in tasks {
        let (off, len, got) = t.await.unwrap();
        assert_eq!(&got[..], &data[off as usize..(off + len) as usize]);
    }
    assert_eq!(&b.read_at(123, 4567).await.unwrap()[..], &data[123..4690]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_cache_answering_whole_is_waited_for_until_it_answers_ranges() {
    let (data, digest) = blob();
    let cache = serve(Mode::Stores(3), data.clone(), digest.clone(), Bytes::new());
    let origin = serve(Mode::Ranges, data.clone(), digest.clone(), Bytes::new());
    let routes = [
        route(&cache.addr, Capabilities::PULL, true),
        route(&origin.addr, Capabilities::ALL, false),
    ];
    let r = repo_waiting(&routes, "stores", Duration::from_secs(20));
    let b = Arc::new(RepoBlob::new(r.clone(), &digest, data.len() as u64));
    read_all_over(&b, &data).await;
    // Three whole answers hung up on (one reader asking for all), then six ranges.
    assert_eq!(cache.gets.load(Ordering::SeqCst), 3 + 6);
    assert_eq!(origin.gets.load(Ordering::SeqCst), 0);
    let f = &r.figures()[0];
    assert_eq!((f.whole_streams, f.waited_for_store), (0, 1), "{f:?}");
    // The blob's bytes came by range only: far less than a whole answer each time.
    assert_eq!(f.served[&digest], 100 + 5000 + 1000 + 70_000 + 1 + 4567);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_host_that_never_stores_the_blob_streams_it_whole_when_the_wait_runs_out() {
    let (data, digest) = blob();
    let host = serve(
        Mode::Stores(usize::MAX),
        data.clone(),
        digest.clone(),
        Bytes::new(),
    );
    let r = repo_waiting(
        &[route(&host.addr, Capabilities::ALL, false)],
        "never",
        Duration::from_millis(700),
    );
    let b = Arc::new(RepoBlob::new(r.clone(), &digest, data.len() as u64));
    read_all_over(&b, &data).await;
    // Asked at about 0, 0.25, 0.625 s, then once more when the wait ran out: that answer is
    // streamed. (The image's own registry: the first reads went out beside the probe, and
    // up to four more whole answers were hung up on.)
    let gets = host.gets.load(Ordering::SeqCst);
    assert!((3..=9).contains(&gets), "{gets} GETs");
    let f = &r.figures()[0];
    assert_eq!((f.whole_streams, f.waited_for_store), (1, 0), "{f:?}");
    assert_eq!(
        *r.hosts[0].filling.lock().unwrap(),
        Filling::Never,
        "not waited for again"
    );
    let _ = std::fs::remove_dir_all(spool_dir("never"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_mirror_that_sends_blobs_whole_is_asked_once_for_all_readers() {
    let (data, digest) = blob();
    let host = serve(Mode::Whole, data.clone(), digest.clone(), Bytes::new());
    let origin = serve(Mode::Missing, data.clone(), digest.clone(), Bytes::new());
    let routes = [
        route(&host.addr, Capabilities::PULL, true),
        route(&origin.addr, Capabilities::ALL, false),
    ];
    let r = repo(&routes, "whole-mirror");
    let b: Arc<RepoBlob> = Arc::new(RepoBlob::new(r.clone(), &digest, data.len() as u64));
    // Reads at once and one after: the first probes alone, all are served from its stream.
    read_all_over(&b, &data).await;
    assert_eq!(
        host.gets.load(Ordering::SeqCst),
        1,
        "one request for every read"
    );
    let f = &r.figures()[0];
    assert_eq!((f.whole_streams, f.bytes), (1, data.len() as u64));
    assert_eq!(origin.gets.load(Ordering::SeqCst), 0);
    let _ = std::fs::remove_dir_all(spool_dir("whole-mirror"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn at_the_image_registry_reads_go_beside_the_probe_until_it_answers_whole() {
    let (data, digest) = blob();
    let host = serve(Mode::Whole, data.clone(), digest.clone(), Bytes::new());
    let r = repo(&[route(&host.addr, Capabilities::ALL, false)], "whole");
    assert!(r.beside_probe(0));
    let b: Arc<RepoBlob> = Arc::new(RepoBlob::new(r.clone(), &digest, data.len() as u64));
    // Five reads at once: those beside the probe asked too, and hung up on their whole
    // answers (a read that came after the probe's answer asked nothing).
    read_all_over(&b, &data).await;
    let gets = host.gets.load(Ordering::SeqCst);
    assert!((1..=5).contains(&gets), "{gets} GETs");
    assert!(
        !r.beside_probe(0),
        "a whole answer makes reads wait for probes"
    );
    // Every read, then and after, came from the one stream; only its bytes were taken.
    let f = &r.figures()[0];
    assert_eq!((f.whole_streams, f.bytes), (1, data.len() as u64));
    assert_eq!(&b.read_at(7, 70).await.unwrap()[..], &data[7..77]);
    assert_eq!(host.gets.load(Ordering::SeqCst), gets, "no request after");
    let _ = std::fs::remove_dir_all(spool_dir("whole"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_whole_answer_beside_the_probe_is_hung_up_on_and_the_read_waits_for_the_probe() {
    let (data, digest) = blob();
    let host = serve(Mode::Whole, data.clone(), digest.clone(), Bytes::new());
    let r = repo(
        &[route(&host.addr, Capabilities::ALL, false)],
        "beside-whole",
    );
    let b: Arc<RepoBlob> = Arc::new(RepoBlob::new(r.clone(), &digest, data.len() as u64));
    let state = r.ranges(0, &digest);
    state.send_replace(Ranges::Probing);
    let read = {
        let b = b.clone();
        tokio::spawn(async move { b.read_at(1000, 500).await })
    };
    // It asked once beside the probe, hung up on the whole answer, and now waits for it.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!read.is_finished(), "did not wait for the probe");
    assert_eq!(host.gets.load(Ordering::SeqCst), 1);
    assert!(!r.beside_probe(0), "the whole answer was noted");
    assert_eq!(
        r.figures()[0].bytes,
        0,
        "nothing of the whole answer was taken"
    );
    // The probe went away without deciding: the read probes itself, and streams the blob.
    state.send_replace(Ranges::Unknown);
    let got = tokio::time::timeout(Duration::from_secs(10), read).await;
    assert_eq!(&got.unwrap().unwrap().unwrap()[..], &data[1000..1500]);
    assert_eq!(host.gets.load(Ordering::SeqCst), 2);
    let _ = std::fs::remove_dir_all(spool_dir("beside-whole"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn at_the_image_registry_the_first_reads_of_a_blob_do_not_wait_for_one_another() {
    let (data, digest) = blob();
    let host = serve(Mode::Ranges, data.clone(), digest.clone(), Bytes::new());
    let r = repo(&[route(&host.addr, Capabilities::ALL, false)], "beside");
    let b: Arc<RepoBlob> = Arc::new(RepoBlob::new(r.clone(), &digest, data.len() as u64));
    // The probe is under way (no answer yet) when a second read comes: it goes out at once.
    let state = r.ranges(0, &digest);
    state.send_replace(Ranges::Probing);
    let read = tokio::time::timeout(Duration::from_secs(5), b.read_at(1000, 500)).await;
    assert_eq!(
        &read.expect("waited for the probe").unwrap()[..],
        &data[1000..1500]
    );
    assert!(
        matches!(*state.borrow(), Ranges::Probing),
        "the probe decides"
    );
    assert!(r.beside_probe(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mirrors_that_are_down_lack_the_blob_or_serve_another_are_passed_over() {
    let (data, digest) = blob();
    let down = {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().to_string()
    };
    let missing = serve(Mode::Missing, data.clone(), digest.clone(), Bytes::new());
    let other = serve(
        Mode::Other(Bytes::from_static(b"another blob")),
        data.clone(),
        digest.clone(),
        Bytes::new(),
    );
    let origin = serve(Mode::Ranges, data.clone(), digest.clone(), Bytes::new());
    let routes = [
        route(&down, Capabilities::PULL, true),
        route(&missing.addr, Capabilities::PULL, true),
        route(&other.addr, Capabilities::PULL, true),
        route(&origin.addr, Capabilities::ALL, false),
    ];
    let r = repo(&routes, "fallback");
    let b = RepoBlob::new(r.clone(), &digest, data.len() as u64);
    assert_eq!(&b.read_at(1000, 2000).await.unwrap()[..], &data[1000..3000]);
    assert_eq!(
        &b.read_at(200_000, 100).await.unwrap()[..],
        &data[200_000..200_100]
    );
    // Each mirror was asked once: the down one is left alone, the others lack the blob.
    assert_eq!(missing.gets.load(Ordering::SeqCst), 1);
    assert_eq!(other.gets.load(Ordering::SeqCst), 1);
    assert_eq!(origin.gets.load(Ordering::SeqCst), 2);
    let f = r.figures();
    assert_eq!(
        f.iter().map(|h| h.failures).collect::<Vec<_>>(),
        [1, 1, 1, 0]
    );
    assert!(
        f[2].last_error
            .as_deref()
            .unwrap()
            .contains("digest mismatch"),
        "{f:?}"
    );
    assert_eq!(f[3].served[&digest], 2100);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blob_streamed_whole_with_the_wrong_digest_is_read_from_the_next_host() {
    let (data, digest) = blob();
    let corrupt = serve(Mode::Corrupt, data.clone(), digest.clone(), Bytes::new());
    let origin = serve(Mode::Ranges, data.clone(), digest.clone(), Bytes::new());
    let routes = [
        route(&corrupt.addr, Capabilities::PULL, true),
        route(&origin.addr, Capabilities::ALL, false),
    ];
    let r = repo(&routes, "corrupt");
    // The blob's end is served only once its digest is known: from the registry.
    let b = RepoBlob::new(r.clone(), &digest, data.len() as u64);
    let tail = b.read_at(290_000, 10_000).await.unwrap();
    assert_eq!(&tail[..], &data[290_000..]);
    // Whole reads (configs) are checked at each host.
    assert_eq!(
        r.read_whole(&digest, data.len() as u64).await.unwrap(),
        data
    );
    assert_eq!(
        corrupt.gets.load(Ordering::SeqCst),
        1,
        "not asked again for the blob"
    );
    let _ = std::fs::remove_dir_all(spool_dir("corrupt"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tags_are_resolved_only_where_allowed_and_digests_are_checked() {
    let manifest = Bytes::from_static(br#"{"schemaVersion":2}"#);
    let md = crate::digest::sha256(&manifest);
    let wrong = Bytes::from_static(br#"{"schemaVersion":3}"#);
    let pull_only = serve(Mode::Ranges, Bytes::new(), String::new(), manifest.clone());
    let lying = serve(Mode::Ranges, Bytes::new(), String::new(), wrong);
    let origin = serve(Mode::Ranges, Bytes::new(), String::new(), manifest.clone());
    let routes = [
        route(&pull_only.addr, Capabilities::PULL, true),
        route(&lying.addr, Capabilities::PULL, true),
        route(&origin.addr, Capabilities::ALL, false),
    ];
    let r = repo(&routes, "tags");
    let (body, meta) = r.manifest("latest").await.unwrap();
    assert_eq!(
        (body, meta.digest.as_str()),
        (manifest.clone(), md.as_str())
    );
    assert_eq!(
        pull_only.tags.load(Ordering::SeqCst) + lying.tags.load(Ordering::SeqCst),
        0
    );
    assert_eq!(origin.tags.load(Ordering::SeqCst), 1);
    // By digest: the first mirror serves it (checked); a wrong one is passed over.
    let (body, _) = r.manifest(&md).await.unwrap();
    assert_eq!(body, manifest);
    assert_eq!(pull_only.gets.load(Ordering::SeqCst), 1);
    let routes = [
        route(&lying.addr, Capabilities::PULL, true),
        route(&origin.addr, Capabilities::ALL, false),
    ];
    let r = repo(&routes, "tags2");
    assert_eq!(r.manifest(&md).await.unwrap().0, manifest);
    assert!(
        r.figures()[0]
            .last_error
            .as_deref()
            .unwrap()
            .contains("digest mismatch")
    );
    assert!(
        r.push_target()
            .is_some_and(|(reg, _)| reg.host() == origin.addr)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mirror_answering_5xx_is_passed_over_and_left_alone_for_a_while() {
    let (data, digest) = blob();
    let broken = serve(Mode::Broken, data.clone(), digest.clone(), Bytes::new());
    let origin = serve(Mode::Ranges, data.clone(), digest.clone(), Bytes::new());
    let routes = [
        route(&broken.addr, Capabilities::PULL, true),
        route(&origin.addr, Capabilities::ALL, false),
    ];
    let r = repo(&routes, "broken");
    let b = RepoBlob::new(r.clone(), &digest, data.len() as u64);
    assert_eq!(&b.read_at(7, 70).await.unwrap()[..], &data[7..77]);
    // Retried once (a host with a fallback: two tries), then the registry served it.
    assert_eq!(broken.gets.load(Ordering::SeqCst), 2);
    assert_eq!(r.figures()[0].failures, 1);
    // The mirror is left alone for a few seconds (BUSY_FOR): the next read goes to the
    // registry at once, not through another failure and backoff.
    assert_eq!(&b.read_at(100, 10).await.unwrap()[..], &data[100..110]);
    assert_eq!(broken.gets.load(Ordering::SeqCst), 2);
    assert_eq!(origin.gets.load(Ordering::SeqCst), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_wait_under_way_is_not_cut_short_when_another_runs_out() {
    let (data, digest) = blob();
    let cache = serve(Mode::Stores(3), data.clone(), digest.clone(), Bytes::new());
    let r = repo_waiting(
        &[route(&cache.addr, Capabilities::ALL, false)],
        "not-cut-short",
        Duration::from_secs(20),
    );
    let b = Arc::new(RepoBlob::new(r.clone(), &digest, data.len() as u64));
    let read = {
        let b = b.clone();
        tokio::spawn(async move { b.read_at(1000, 5000).await.unwrap() })
    };
    // During the first pause (at least 187 ms): another blob's wait at this host ran out
    // before it ever answered a range.
    tokio::time::sleep(Duration::from_millis(100)).await;
    *r.hosts[0].filling.lock().unwrap() = Filling::Never;
    assert_eq!(&read.await.unwrap()[..], &data[1000..6000]);
    let f = &r.figures()[0];
    assert_eq!((f.whole_streams, f.waited_for_store), (0, 1), "{f:?}");
    // It answered a range: worth waiting for again.
    assert_eq!(*r.hosts[0].filling.lock().unwrap(), Filling::Fills);
    let _ = std::fs::remove_dir_all(spool_dir("not-cut-short"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_read_waiting_for_a_probe_that_succeeded_reads_there_though_the_host_turned_busy() {
    let (data, digest) = blob();
    let cache = serve(Mode::Stores(2), data.clone(), digest.clone(), Bytes::new());
    let origin = serve(Mode::Ranges, data.clone(), digest.clone(), Bytes::new());
    let routes = [
        route(&cache.addr, Capabilities::PULL, true),
        route(&origin.addr, Capabilities::ALL, false),
    ];
    let r = repo_waiting(&routes, "busy-meanwhile", Duration::from_secs(20));
    let b = Arc::new(RepoBlob::new(r.clone(), &digest, data.len() as u64));
    let spawn_read = |off: u64| {
        let b = b.clone();
        tokio::spawn(async move { (off, b.read_at(off, 3000).await.unwrap()) })
    };
    // The first read probes and waits for the cache; the second waits for that probe.
    let first = spawn_read(0);
    tokio::time::sleep(Duration::from_millis(50)).await;
    let second = spawn_read(200_000);
    tokio::time::sleep(Duration::from_millis(50)).await;
    // Meanwhile another request to the cache was answered 503.
    r.hosts[0].down_for(BUSY_FOR);
    for t in [first, second] {
        let (off, got) = t.await.unwrap();
        assert_eq!(&got[..], &data[off as usize..off as usize + 3000]);
    }
    // Both read from the cache once it answered ranges; none went to the origin.
    assert_eq!(origin.gets.load(Ordering::SeqCst), 0);
    assert_eq!(cache.gets.load(Ordering::SeqCst), 2 + 2);
    let _ = std::fs::remove_dir_all(spool_dir("busy-meanwhile"));
}

#[tokio::test]
async fn an_empty_blob_is_checked_not_asked_for() {
    let (data, digest) = blob();
    let host = serve(Mode::Ranges, data, digest, Bytes::new());
    let r = repo(&[route(&host.addr, Capabilities::ALL, false)], "empty");
    let empty = crate::digest::sha256(b"");
    assert!(r.read_whole(&empty, 0).await.unwrap().is_empty());
    assert!(matches!(
        r.read_whole(&crate::digest::sha256(b"x"), 0).await,
        Err(Error::Digest { .. })
    ));
    assert_eq!(host.gets.load(Ordering::SeqCst), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn asking_a_plain_registry_whether_it_speaks_tls_opens_its_first_connections() {
    let (data, digest) = blob();
    let manifest = Bytes::from_static(br#"{"schemaVersion":2}"#);
    let host = serve(Mode::Ranges, data, digest, manifest.clone());
    let first = repo(
        &[route(&host.addr, Capabilities::ALL, false)],
        "tls-question",
    );
    let registry = first.host(0).unwrap();
    assert_eq!(
        registry.speaks_tls(Some(("t/app", "v1"))).await,
        Some(false)
    );
    // The plain question (for the manifest) and the connections opened beside it were all
    // answered by the time the answer is known ...
    let warm = crate::registry::WARM_CONNECTIONS;
    assert_eq!(host.gets.load(Ordering::SeqCst), warm);
    assert_eq!(host.tags.load(Ordering::SeqCst), 1);
    // ... and left in the client's pool: as many requests at once open few connections, if
    // any (hyper starts a connect for a request that finds no idle connection, and uses
    // whichever is ready first: a pooled one a moment from idle, usually; under load more
    // than one request may find none: two did in a clean-clone CI run). Unpooled, all would
    // be new. The TLS half of the question may have opened one more, which the host never
    // answered (not when the plain answer came first and it was dropped before connecting);
    // and one of the requests beside the question may have found its connection back in
    // the pool already (2 runs in 150 on a loaded machine).
    tokio::time::sleep(Duration::from_millis(50)).await;
    let conns = host.conns.load(Ordering::SeqCst);
    assert!(
        (warm - 1..=warm + 1).contains(&conns),
        "{conns} connections"
    );
    registry.open_connections(warm).await;
    assert_eq!(host.gets.load(Ordering::SeqCst), 2 * warm);
    let opened = host.conns.load(Ordering::SeqCst) - conns;
    assert!(
        opened < warm / 2,
        "connections reused: {opened} new for {warm} requests"
    );
    // The mount's own warming that follows has nothing left to open.
    registry.warm(warm).await;
    assert_eq!(host.gets.load(Ordering::SeqCst), 2 * warm);
    // The manifest asked for first is the question's answer: no request ...
    let (body, meta) = first.manifest("v1").await.unwrap();
    assert_eq!(body, manifest);
    assert_eq!(meta.digest, crate::digest::sha256(&manifest));
    assert_eq!(host.gets.load(Ordering::SeqCst), 2 * warm);
    // ... once: asked again, it is asked of the registry.
    first.manifest("v1").await.unwrap();
    assert_eq!(host.tags.load(Ordering::SeqCst), 2);
    // Asked about a host the first requests do not go to: the question alone.
    let other = serve(Mode::Ranges, blob().0, blob().1, Bytes::new());
    let second = repo(
        &[route(&other.addr, Capabilities::ALL, false)],
        "tls-question-2",
    );
    assert_eq!(second.host(0).unwrap().speaks_tls(None).await, Some(false));
    assert_eq!(other.gets.load(Ordering::SeqCst), 1);
}

/// A host answering as `mode` (manifests: `manifest`), asked the TLS question for manifest
/// `t/app:v1` as the host the first requests go to: plain HTTP, one tag asked.
async fn asked_for_v1(mode: Mode, manifest: Bytes, tag: &str) -> (TestHost, Arc<Repo>) {
    let (data, digest) = blob();
    let host = serve(mode, data, digest, manifest);
    let r = repo(&[route(&host.addr, Capabilities::ALL, false)], tag);
    let registry = r.host(0).unwrap();
    assert_eq!(
        registry.speaks_tls(Some(("t/app", "v1"))).await,
        Some(false)
    );
    assert_eq!(host.tags.load(Ordering::SeqCst), 1);
    (host, r)
}

#[tokio::test]
async fn a_plain_answer_other_than_ok_is_not_kept_for_the_manifest() {
    // A 404 still says the host is plain HTTP ...
    let (host, r) = asked_for_v1(Mode::Missing, Bytes::new(), "tls-question-404").await;
    // ... and the manifest is asked for again, the error coming from that answer.
    assert!(matches!(r.manifest("v1").await, Err(Error::NotFound(_))));
    assert_eq!(host.tags.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn a_kept_manifest_answers_only_its_own_reference_and_is_checked() {
    let manifest = Bytes::from_static(br#"{"schemaVersion":2}"#);
    let (host, r) = asked_for_v1(Mode::Ranges, manifest, "tls-question-other").await;
    // Another tag is asked of the registry, and the kept answer is gone with that ask.
    r.manifest("v2").await.unwrap();
    assert_eq!(host.tags.load(Ordering::SeqCst), 2);
    r.manifest("v1").await.unwrap();
    assert_eq!(host.tags.load(Ordering::SeqCst), 3);
    // Kept for a digest it does not match: refused, not served.
    let registry = r.host(0).unwrap();
    let wrong = format!("sha256:{}", "0".repeat(64));
    assert_eq!(
        registry.speaks_tls(Some(("t/app", &wrong))).await,
        Some(false)
    );
    let got = registry.get_manifest("t/app", &wrong).await;
    assert!(matches!(got, Err(Error::Digest { .. })), "{got:?}");
}

#[tokio::test]
async fn a_registry_answering_the_manifest_400_is_still_plain_http() {
    // Its 400 says it is a registry: plain HTTP (a TLS port's 400 says nothing of the kind).
    let (_host, r) = asked_for_v1(Mode::Refuses, Bytes::new(), "tls-question-400").await;
    assert!(r.manifest("v1").await.is_err());
}
