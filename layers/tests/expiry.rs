#![cfg(feature = "expiry")]

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::request::Parts;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use tower::{service_fn, BoxError, Layer, ServiceExt};
use upgate_layers::expiry::{DeadlineLookup, Expiring, ExpiryLayer, TokioClock};

type Body = Full<Bytes>;

#[derive(Clone, Debug, PartialEq)]
struct Session {
    id: String,
}

/// Sessions under /sessions/<id>; "fail" makes the lookup fail.
struct Sessions {
    expires_at: SystemTime,
}

impl DeadlineLookup for Sessions {
    type Info = Session;

    fn lookup(
        &self,
        parts: &Parts,
    ) -> impl std::future::Future<Output = Result<Option<Expiring<Session>>, BoxError>> + Send {
        let id = parts
            .uri
            .path()
            .strip_prefix("/sessions/")
            .map(str::to_owned);
        let expires_at = self.expires_at;
        async move {
            match id.as_deref() {
                Some("fail") => Err("redis down".into()),
                Some(_) => Ok(id.map(|id| Expiring {
                    expires_at,
                    info: Session { id },
                })),
                None => Ok(None),
            }
        }
    }
}

fn secs(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

#[tokio::test(start_paused = true)]
async fn expires_with_paused_time_and_builder_gets_data() {
    let start = UNIX_EPOCH + Duration::from_secs(1_000_000);
    let clock = TokioClock::starting_at(start);
    let calls = Arc::new(AtomicUsize::new(0));
    let side_effects = Arc::new(AtomicUsize::new(0));
    let inner = {
        let calls = calls.clone();
        service_fn(move |req: Request<Body>| {
            let calls = calls.clone();
            async move {
                calls.fetch_add(1, Ordering::SeqCst);
                let e = req
                    .extensions()
                    .get::<Expiring<Session>>()
                    .expect("Expiring in extensions");
                Ok::<_, BoxError>(Response::new(Body::new(Bytes::from(e.info.id.clone()))))
            }
        })
    };
    let fx = side_effects.clone();
    let svc = ExpiryLayer::new(Sessions {
        expires_at: start + Duration::from_secs(60),
    })
    .clock(clock)
    .expired_response(
        move |e: &Expiring<Session>, now: SystemTime, parts: &Parts| {
            fx.fetch_add(1, Ordering::SeqCst);
            let body = format!(
                "{} {} {} {}",
                e.info.id,
                secs(e.expires_at),
                secs(now),
                parts.uri.path()
            );
            let mut res = Response::new(Body::new(Bytes::from(body)));
            *res.status_mut() = StatusCode::GONE;
            res
        },
    )
    .layer(inner);

    let get = |p: &str| Request::get(p).body(Body::default()).unwrap();
    let res = svc.clone().oneshot(get("/sessions/s1")).await.unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(res.into_body().collect().await.unwrap().to_bytes(), "s1");

    tokio::time::advance(Duration::from_secs(59)).await;
    assert_eq!(
        svc.clone()
            .oneshot(get("/sessions/s1"))
            .await
            .unwrap()
            .status(),
        200
    );

    // now == expires_at is expired.
    tokio::time::advance(Duration::from_secs(1)).await;
    let res = svc.clone().oneshot(get("/sessions/s1")).await.unwrap();
    assert_eq!(res.status(), StatusCode::GONE);
    assert_eq!(
        res.into_body().collect().await.unwrap().to_bytes(),
        "s1 1000060 1000060 /sessions/s1"
    );
    assert_eq!(calls.load(Ordering::SeqCst), 2);
    assert_eq!(side_effects.load(Ordering::SeqCst), 1);

    // Lookup errors are errors.
    let err = svc
        .clone()
        .oneshot(get("/sessions/fail"))
        .await
        .unwrap_err();
    assert!(err.downcast_ref::<upgate_layers::expiry::Error>().is_some());
}

#[tokio::test]
async fn unknown_resources_pass_through_and_default_is_410() {
    let svc = ExpiryLayer::new(Sessions {
        expires_at: UNIX_EPOCH,
    })
    .layer(service_fn(|req: Request<Body>| async move {
        assert!(req.extensions().get::<Expiring<Session>>().is_none());
        Ok::<_, BoxError>(Response::new(Body::default()))
    }));
    let res = svc
        .clone()
        .oneshot(Request::get("/other").body(Body::default()).unwrap())
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let res = svc
        .clone()
        .oneshot(Request::get("/sessions/x").body(Body::default()).unwrap())
        .await
        .unwrap();
    assert_eq!(res.status(), 410);
}
