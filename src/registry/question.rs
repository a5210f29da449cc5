//! Whether a registry that may be plain HTTP (localhost, `--insecure`) speaks TLS: asked once,
//! as skopeo tries https first and falls back to http, and used to open the connections the
//! first requests will want and, at the host a pull starts with, to ask for its manifest.
//!
//! Two questions race, and the first clear answer wins. A TLS handshake by a client that
//! trusts no authority (so asking loads none of the system's): a TLS server fails it with a
//! certificate error, a plain one answers with HTTP or hangs up. And a plain request: a
//! registry answers 200, 401 or 404 (and says it is one), a TLS port 400 ("an HTTP request to
//! an HTTPS server") or nothing. A Go HTTP server (docker-registry) took 30-100 ms to answer
//! a TLS hello and 2-10 ms to answer the plain request (the race: 4-20 ms); a server that
//! hangs up on a TLS hello answers the handshake first. The plain request is sent with the
//! registry's own plain client, so a plain registry's answer leaves its connection in that
//! client's pool for the next request; and when it is the manifest a pull asks for first
//! (not `GET /v2/`), its `200 OK` is kept for [`Registry::get_manifest`]: one round trip
//! fewer on a WAN link.

use super::http::{TlsFailure, builder, tls_failure};
use super::{MANIFEST_ACCEPT, Registry, WARM_CONNECTIONS, read_limited};
use crate::task::TaskGuard;
use bytes::Bytes;
use reqwest::{StatusCode, header};
use std::sync::atomic::Ordering;
use std::time::Duration;

/// The plain half of [`speaks_tls`]: the client to ask with and what to ask (the API root,
/// or already the request a pull sends first: then a plain registry's answer is kept).
pub struct PlainAsk<'a> {
    pub client: &'a reqwest::Client,
    /// An `http://` URL on the host.
    pub url: String,
    pub headers: header::HeaderMap,
    /// Whether the answer is kept (the request a pull sends first, not `GET /v2/`).
    pub keep: bool,
}

/// A plain registry's `200 OK` to the plain question, its body read (at most
/// [`super::MAX_MANIFEST`] bytes).
#[derive(Debug)]
pub struct PlainAnswer {
    pub headers: header::HeaderMap,
    pub body: Bytes,
}

/// What the plain half learned: whether the port speaks TLS (`None`: its answer does not say,
/// the handshake decides) and a plain registry's `200 OK`.
type PlainOutcome = (Option<bool>, Option<PlainAnswer>);

/// The kept answer to the plain question, or the request still on its way (the handshake
/// answered first): whoever wants it waits for it instead of asking again.
pub struct Kept {
    url: String,
    answer: Answer,
}

enum Answer {
    Here(PlainAnswer),
    Coming(TaskGuard<Option<PlainOutcome>>),
}

impl Kept {
    /// The URL it answers.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The `200 OK`, once it has come; `None` if the request failed or was answered
    /// otherwise (then it is asked again the usual way).
    pub async fn answer(self) -> Option<PlainAnswer> {
        match self.answer {
            Answer::Here(answer) => Some(answer),
            Answer::Coming(mut task) => task.output().await.flatten()?.1,
        }
    }
}

/// Whether the server at `host` (`host[:port]`) speaks TLS: `Some(false)` when it is plain
/// HTTP, `None` when nothing answered at all (the request that follows will say why); and,
/// when `plain` asks to keep it, a plain registry's answer to the plain request (see the
/// module doc).
pub async fn speaks_tls(host: &str, plain: Option<PlainAsk<'_>>) -> (Option<bool>, Option<Kept>) {
    const PATIENCE: Duration = Duration::from_secs(10);
    // A client with no trust roots (so nothing to load) asks the TLS question, and the plain
    // one when the registry's is not given.
    let Ok(client) = builder(None)
        .tls_certs_only(Vec::<reqwest::Certificate>::new())
        .build()
    else {
        return (None, None);
    };
    let handshake = {
        let (client, url) = (client.clone(), format!("https://{host}/v2/"));
        async move {
            match client.get(url).timeout(PATIENCE).send().await {
                Ok(_) => Some(true),
                Err(e) => match tls_failure(&e) {
                    Some(TlsFailure::NotTls) => Some(false),
                    Some(_) => Some(true),
                    None => None,
                },
            }
        }
    };
    let (client, url, headers, keep) = match plain {
        Some(ask) => (ask.client.clone(), ask.url, ask.headers, ask.keep),
        None => (
            client,
            format!("http://{host}/v2/"),
            Default::default(),
            false,
        ),
    };
    let plain = {
        let url = url.clone();
        async move {
            let resp = client
                .get(&url)
                .headers(headers)
                .timeout(PATIENCE)
                .send()
                .await;
            let resp = resp.ok()?;
            let status = resp.status();
            // A registry may answer a manifest 400 too, but says it is one.
            let registry = resp
                .headers()
                .contains_key("docker-distribution-api-version");
            let tls = match status == StatusCode::BAD_REQUEST {
                false => Some(false),
                true if registry => Some(false),
                true if keep => None,
                true => Some(true),
            };
            let headers = resp.headers().clone();
            // Read to the end, or the connection does not go back to the pool.
            let body = read_limited(resp, super::MAX_MANIFEST, "plain answer").await;
            let kept = match body {
                Ok(body) if keep && status == StatusCode::OK => Some(PlainAnswer { headers, body }),
                _ => None,
            };
            Some((tls, kept))
        }
    };
    // Tasks of their own (ended when this returns or is dropped, unless the plain request
    // is handed on): in one task, the handshake's polls held back the plain request for
    // 40-90 ms (measured on a loaded 2-core machine), so that it never answered first.
    let mut handshake = TaskGuard::spawn(handshake);
    let mut plain = TaskGuard::spawn(plain);
    let t0 = std::time::Instant::now();
    enum First {
        Handshake(Option<bool>),
        Plain(Option<PlainOutcome>),
    }
    let first = tokio::select! {
        a = handshake.output() => First::Handshake(a.flatten()),
        b = plain.output() => First::Plain(b.flatten()),
    };
    let here = |kept: Option<PlainAnswer>| kept.map(Answer::Here);
    let (answer, kept) = match first {
        First::Handshake(Some(false)) => (Some(false), keep.then_some(Answer::Coming(plain))),
        First::Handshake(Some(true)) => (Some(true), None),
        First::Handshake(None) => match plain.output().await.flatten() {
            Some((tls, kept)) => (tls, here(kept)),
            None => (None, None),
        },
        First::Plain(Some((Some(tls), kept))) => (Some(tls), here(kept)),
        First::Plain(Some((None, kept))) => (handshake.output().await.flatten(), here(kept)),
        First::Plain(None) => (handshake.output().await.flatten(), None),
    };
    tracing::debug!(
        "{host} speaks TLS: {answer:?} ({:?}){}",
        t0.elapsed(),
        if kept.is_some() {
            ", its plain answer kept"
        } else {
            ""
        }
    );
    let kept = kept
        .filter(|_| answer == Some(false))
        .map(|answer| Kept { url, answer });
    (answer, kept)
}

impl Registry {
    /// Whether this registry, reached over plain HTTP, speaks TLS after all (see
    /// [`speaks_tls`]), asked with its own plain client. `first`, at the host the first
    /// requests go to, the manifest (repository, tag or digest) they start with: the other
    /// connections those requests want are opened beside the question, and the question
    /// asks for that manifest (with no header but `Accept`: whether the port speaks TLS is
    /// not yet known), whose answer [`Registry::get_manifest`] then takes.
    pub async fn speaks_tls(&self, first: Option<(&str, &str)>) -> Option<bool> {
        let host = (self.origin.split_once("://")).map_or(&*self.origin, |(_, h)| h);
        let ask = self.http.plain().map(|client| {
            let (url, headers) = match first {
                Some((repo, reference)) => {
                    let mut headers = header::HeaderMap::new();
                    headers.insert(header::ACCEPT, MANIFEST_ACCEPT.parse().unwrap());
                    (self.url(&format!("{repo}/manifests/{reference}")), headers)
                }
                None => (format!("{}/", self.api), Default::default()),
            };
            PlainAsk {
                client,
                url,
                headers,
                keep: first.is_some(),
            }
        });
        let question = async {
            let (answer, kept) = speaks_tls(host, ask).await;
            *self.primed.lock().unwrap() = kept;
            answer
        };
        if first.is_none() {
            return question.await;
        }
        // Opened now rather than a round trip later, as the manifest is asked for (measured
        // on the packet link: ready 35 ms sooner). Only a plain registry's answer waits for
        // them, a moment at most: it has just answered a request on another connection. A
        // TLS port answers them 400, or never: not waited for.
        use futures::future::{Either, select};
        let mut opening = std::pin::pin!(self.open_connections(WARM_CONNECTIONS - 1));
        let (answer, mut opened) = match select(std::pin::pin!(question), opening.as_mut()).await {
            Either::Left((answer, _)) => (answer, false),
            Either::Right(((), question)) => (question.await, true),
        };
        if answer == Some(false) && !opened {
            let patience = std::time::Duration::from_secs(2);
            opened = tokio::time::timeout(patience, opening).await.is_ok();
        }
        self.warmed
            .store(answer == Some(false) && opened, Ordering::Relaxed);
        answer
    }

    /// Opens `n` connections at once, each with a `GET /v2/` (answered 200 or 401 alike),
    /// and leaves them in the client's pool. Opened while the manifest is fetched, they spare
    /// the requests that follow it a TCP (and TLS) handshake each: a round trip on a WAN
    /// link. Failures are left to the requests that matter.
    pub async fn warm(&self, n: usize) {
        if self.warmed.swap(false, Ordering::Relaxed) {
            return;
        }
        self.open_connections(n).await
    }

    /// `n` requests of `GET /v2/` at once, each read to its end (see [`Registry::warm`]).
    pub(crate) async fn open_connections(&self, n: usize) {
        let url = format!("{}/", self.api);
        let Ok(client) = self.http.for_url(&url) else {
            return;
        };
        let opens = (0..n).map(|_| async {
            if let Ok(r) = client.get(&url).send().await {
                // Read to the end, or the connection does not go back to the pool.
                let _ = read_limited(r, 64 << 10, "/v2/").await;
            }
        });
        futures::future::join_all(opens).await;
    }
}
