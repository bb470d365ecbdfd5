//! One conformance suite for every [`SessionStore`] backend.
//!
//! Each case is an `async fn(Ctx)`, written once. `for_each_case!` lists them and turns the
//! list into:
//! * `memory::*`: one test per case on a fresh [`MemoryStore`];
//! * `redis_single::*`: one test per case on a fresh `redis-server` (testkit);
//! * `redis_cluster_all_cases`: every case (each under its own key prefix) on one shared
//!   real 3-master Redis Cluster, failures collected and reported together.
//!
//! Time is controlled by the caller (`now_ms`), starting from the real clock so that Redis
//! key TTLs (which follow the real clock) never fire during a test.

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::future::join_all;
use upgate::model::{FileRecord, FileStatus, PartRecord, SessionRecord, SessionStatus};
use upgate::store::memory::MemoryStore;
use upgate::store::redis::{RedisHandle, RedisStore, RedisStoreOptions};
use upgate::store::{
    Attempted, BeginComplete, ClaimedEvents, Cleanup, FileAborted, Finalized, Gate, Page,
    Registered, SessionAborted, SessionStore, TailOp, TusAdvance, TusAdvanced, TusBegin, TusBegun,
    UploadIdSet,
};

const RETENTION: Duration = Duration::from_secs(24 * 3600);
const TTL_S: i64 = 600;

/// What every case gets: a store and a clock origin (seconds, real time at start).
#[derive(Clone)]
struct Ctx {
    store: Arc<dyn SessionStore>,
    t0: i64,
}

impl Ctx {
    fn new(store: Arc<dyn SessionStore>) -> Self {
        Ctx {
            store,
            t0: upgate::model::now_ms() / 1000,
        }
    }

    /// `now_ms` at `secs` after the origin.
    fn at(&self, secs: i64) -> i64 {
        (self.t0 + secs) * 1000
    }

    /// A "live" time: one second after the origin.
    fn now(&self) -> i64 {
        self.at(1)
    }

    /// The first instant a session created by [`Ctx::session`] counts as expired.
    fn expiry(&self) -> i64 {
        self.at(TTL_S)
    }

    async fn session(&self, tenant: &str, file_limit: u32) -> SessionRecord {
        self.session_ttl(tenant, file_limit, TTL_S).await
    }

    async fn session_ttl(&self, tenant: &str, file_limit: u32, ttl: i64) -> SessionRecord {
        let s = self.session_record(tenant, file_limit, ttl);
        self.store.create_session(&s).await.expect("create_session");
        s
    }

    fn session_record(&self, tenant: &str, file_limit: u32, ttl: i64) -> SessionRecord {
        SessionRecord {
            id: uuid::Uuid::new_v4().to_string(),
            tenant: tenant.to_owned(),
            status: SessionStatus::Active,
            part_size_bytes: 5 * 1024 * 1024,
            max_files: Some(file_limit),
            file_limit,
            file_count: 0,
            created_at: self.t0,
            expires_at: self.t0 + ttl,
            metadata: serde_json::json!({"project": "x", "n": 3, "nested": {"a": [1, 2.5, null, true]}}),
            owner: None,
            max_file_size_bytes: None,
            allowed_content_types: None,
            outbox_keep_ms: None,
        }
    }

    async fn register(&self, tenant: &str, s: &SessionRecord, key: &str) -> FileRecord {
        let f = file(&s.id, key, self.t0);
        match self
            .store
            .register_file(tenant, &f, self.now())
            .await
            .expect("register")
        {
            Gate::Ok(Registered::Created(created)) => {
                assert_eq!(created, f);
                created
            }
            other => panic!("register {key}: {other:?}"),
        }
    }

    async fn get(&self, tenant: &str, s: &SessionRecord) -> upgate::store::SessionView {
        match self
            .store
            .get_session(tenant, &s.id, Page::FIRST, self.now())
            .await
            .expect("get_session")
        {
            Gate::Ok(v) => v,
            other => panic!("get_session: {other:?}"),
        }
    }

    async fn file(&self, tenant: &str, s: &SessionRecord, f: &FileRecord) -> FileRecord {
        match self
            .store
            .get_file(tenant, &s.id, &f.id, false, self.now())
            .await
            .expect("get_file")
        {
            Gate::Ok(f) => f,
            other => panic!("get_file: {other:?}"),
        }
    }

    /// Registers, uploads one part, completes.
    async fn completed(&self, tenant: &str, s: &SessionRecord, key: &str) -> FileRecord {
        let f = self.register(tenant, s, key).await;
        let st = self
            .store
            .set_upload_id(tenant, &s.id, &f.id, "up-1", self.now())
            .await
            .unwrap();
        assert_eq!(st, Gate::Ok(UploadIdSet::Stored));
        let p = part(1, "e1", 10);
        assert!(matches!(
            self.store
                .record_part(tenant, &s.id, &f.id, &p, self.now())
                .await
                .unwrap(),
            Gate::Ok(_)
        ));
        let tok = uuid::Uuid::new_v4().to_string();
        let got = self
            .store
            .begin_complete(tenant, &s.id, &f.id, &tok, 30_000, self.now())
            .await
            .unwrap();
        assert!(
            matches!(got, Gate::Ok(BeginComplete::Acquired(_, _))),
            "{got:?}"
        );
        let done = self
            .store
            .finish_complete(tenant, &s.id, &f.id, &tok, "file:///x", "etag-final", 0)
            .await
            .unwrap();
        match done {
            Gate::Ok(Some(f)) => {
                assert_eq!(f.status, FileStatus::Completed);
                f
            }
            other => panic!("finish_complete: {other:?}"),
        }
    }
}

fn file(session_id: &str, key: &str, created_at: i64) -> FileRecord {
    FileRecord {
        id: uuid::Uuid::new_v4().to_string(),
        session_id: session_id.to_owned(),
        file_key: key.to_owned(),
        file_name: format!("name of {key}"),
        size_bytes: 5_497_558_138_880, // 5 TiB: exercises large numbers
        content_type: if key.len().is_multiple_of(2) {
            Some("image/png".to_owned())
        } else {
            None
        },
        status: FileStatus::Registered,
        part_size_bytes: 550_502_400,
        part_count: 9987,
        created_at,
        object_key: format!("t/{session_id}/{key}"),
        upload_id: None,
        file_url: None,
        etag: None,
        // Stored and returned as sent by every backend (JSON special characters included).
        metadata: [
            ("source".to_owned(), "camera \"A\", ü".to_owned()),
            ("k".to_owned(), key.to_owned()),
        ]
        .into(),
        tus_form: None,
    }
}

fn part(n: u32, etag: &str, size: u64) -> PartRecord {
    PartRecord {
        part_number: n,
        etag: etag.to_owned(),
        size_bytes: size,
    }
}

fn expired_first<T: std::fmt::Debug>(g: &Gate<T>) -> bool {
    match g {
        Gate::Expired(info) => info.first_observation,
        other => panic!("expected Expired, got {other:?}"),
    }
}

// =======================================================================================
// Cases
// =======================================================================================

mod cases {
    use super::*;

    pub(crate) async fn create_get_and_deadline(c: Ctx) {
        let s = c.session("t1", 5).await;
        let v = c.get("t1", &s).await;
        assert_eq!(v.session, s, "session round-trips exactly");
        assert!(v.files.is_empty());
        assert_eq!(
            c.store.session_deadline("t1", &s.id).await.unwrap(),
            Some((s.expires_at, s.created_at))
        );
        assert_eq!(c.store.session_deadline("t2", &s.id).await.unwrap(), None);
        assert_eq!(
            c.store.session_deadline("t1", "missing").await.unwrap(),
            None
        );
        // Optional fields and empty metadata round-trip too.
        let mut s2 = s.clone();
        s2.id = uuid::Uuid::new_v4().to_string();
        s2.max_files = None;
        s2.metadata = serde_json::json!({});
        c.store.create_session(&s2).await.unwrap();
        assert_eq!(c.get("t1", &s2).await.session, s2);
        // An end user's session keeps its owner; the owner lookup tells the three cases apart.
        let mut s3 = s.clone();
        s3.id = uuid::Uuid::new_v4().to_string();
        s3.owner = Some("user {a}:1".into());
        c.store.create_session(&s3).await.unwrap();
        assert_eq!(c.get("t1", &s3).await.session, s3);
        assert_eq!(
            c.store.session_owner("t1", &s3.id).await.unwrap(),
            Some(Some("user {a}:1".into()))
        );
        assert_eq!(
            c.store.session_owner("t1", &s.id).await.unwrap(),
            Some(None)
        );
        assert_eq!(c.store.session_owner("t2", &s3.id).await.unwrap(), None);
        assert_eq!(c.store.session_owner("t1", "missing").await.unwrap(), None);
        // A session with an end user's file limits refuses files outside them.
        let mut s4 = s.clone();
        s4.id = uuid::Uuid::new_v4().to_string();
        s4.max_file_size_bytes = Some(10);
        s4.allowed_content_types = Some(vec!["image/*".into(), "application/pdf".into()]);
        c.store.create_session(&s4).await.unwrap();
        assert_eq!(c.get("t1", &s4).await.session, s4);
        let file = |size: u64, ct: Option<&str>| {
            let mut f = file(&s4.id, &format!("k{size}{ct:?}"), s4.created_at);
            f.size_bytes = size;
            f.part_size_bytes = s4.part_size_bytes;
            f.part_count = 1;
            f.content_type = ct.map(str::to_owned);
            f
        };
        let now = c.now();
        for (f, expected) in [
            (file(11, Some("image/png")), Some(Registered::TooLarge(10))),
            (
                file(5, Some("text/plain")),
                Some(Registered::ContentTypeNotAllowed(vec![
                    "image/*".into(),
                    "application/pdf".into(),
                ])),
            ),
            (
                file(5, None),
                Some(Registered::ContentTypeNotAllowed(vec![
                    "image/*".into(),
                    "application/pdf".into(),
                ])),
            ),
            (file(10, Some("IMAGE/PNG; x=1")), None),
            (file(3, Some("application/pdf")), None),
        ] {
            match (
                c.store.register_file("t1", &f, now).await.unwrap(),
                expected,
            ) {
                (Gate::Ok(Registered::Created(_)), None) => {}
                (Gate::Ok(got), Some(want)) => assert_eq!(got, want, "{:?}", f.content_type),
                (other, want) => panic!("{:?}: {other:?}, expected {want:?}", f.content_type),
            }
        }
        c.store.ping().await.unwrap();
    }

    pub(crate) async fn gate_not_found_and_cross_tenant(c: Ctx) {
        let s = c.session("t1", 5).await;
        let f = c.register("t1", &s, "a.txt").await;
        let now = c.now();
        let st = &c.store;
        assert_eq!(
            st.get_session("t2", &s.id, Page::FIRST, now).await.unwrap(),
            Gate::SessionNotFound
        );
        assert_eq!(
            st.get_session("t1", "nope", Page::FIRST, now)
                .await
                .unwrap(),
            Gate::SessionNotFound
        );
        assert_eq!(
            st.get_file("t2", &s.id, &f.id, false, now).await.unwrap(),
            Gate::SessionNotFound
        );
        assert_eq!(
            st.get_file("t1", &s.id, "nofile", false, now)
                .await
                .unwrap(),
            Gate::FileNotFound
        );
        assert_eq!(
            st.get_file("t1", &s.id, "nofile", true, now).await.unwrap(),
            Gate::FileNotFound
        );
        let other = file(&s.id, "b", c.t0);
        assert_eq!(
            st.register_file("t2", &other, now).await.unwrap(),
            Gate::SessionNotFound
        );
        assert_eq!(
            st.set_upload_id("t2", &s.id, &f.id, "u", now)
                .await
                .unwrap(),
            Gate::SessionNotFound
        );
        assert_eq!(
            st.set_upload_id("t1", &s.id, "nofile", "u", now)
                .await
                .unwrap(),
            Gate::FileNotFound
        );
        assert_eq!(
            st.record_part("t2", &s.id, &f.id, &part(1, "e", 1), now)
                .await
                .unwrap(),
            Gate::SessionNotFound
        );
        assert_eq!(
            st.record_part("t1", &s.id, "nofile", &part(1, "e", 1), now)
                .await
                .unwrap(),
            Gate::FileNotFound
        );
        assert_eq!(
            st.list_parts("t2", &s.id, &f.id, now).await.unwrap(),
            Gate::SessionNotFound
        );
        assert_eq!(
            st.list_parts("t1", &s.id, "nofile", now).await.unwrap(),
            Gate::FileNotFound
        );
        assert_eq!(
            st.begin_complete("t2", &s.id, &f.id, "k", 1000, now)
                .await
                .unwrap(),
            Gate::SessionNotFound
        );
        assert_eq!(
            st.begin_complete("t1", &s.id, "nofile", "k", 1000, now)
                .await
                .unwrap(),
            Gate::FileNotFound
        );
        assert_eq!(
            st.finish_complete("t2", &s.id, &f.id, "k", "u", "e", 0)
                .await
                .unwrap(),
            Gate::SessionNotFound
        );
        assert_eq!(
            st.finish_complete("t1", &s.id, "nofile", "k", "u", "e", 0)
                .await
                .unwrap(),
            Gate::FileNotFound
        );
        st.release_complete("t2", &s.id, &f.id, "k").await.unwrap();
        assert_eq!(
            st.abort_file("t2", &s.id, &f.id, now).await.unwrap(),
            Gate::SessionNotFound
        );
        assert_eq!(
            st.abort_file("t1", &s.id, "nofile", now).await.unwrap(),
            Gate::FileNotFound
        );
        assert_eq!(
            st.abort_session("t2", &s.id, now).await.unwrap(),
            Gate::SessionNotFound
        );
        assert_eq!(
            st.finalize("t2", &s.id, &[], now).await.unwrap(),
            Gate::SessionNotFound
        );
        assert_eq!(st.reap("t2", &s.id, now).await.unwrap(), None);
        // Nothing of the above touched t1's session.
        let v = c.get("t1", &s).await;
        assert_eq!(v.session.status, SessionStatus::Active);
        assert_eq!(v.files, vec![f]);
    }

    pub(crate) async fn expired_first_observation_exactly_once(c: Ctx) {
        let s = c.session("t1", 5).await;
        let f = c.register("t1", &s, "a").await;
        // One millisecond before expiry it is still fine.
        assert!(matches!(
            c.store
                .get_session("t1", &s.id, Page::FIRST, c.expiry() - 1)
                .await
                .unwrap(),
            Gate::Ok(_)
        ));
        let t = c.expiry();
        let g = c
            .store
            .get_file("t1", &s.id, &f.id, false, t)
            .await
            .unwrap();
        assert!(expired_first(&g), "first caller observes");
        if let Gate::Expired(info) = &g {
            assert_eq!(info.session.status, SessionStatus::Expired);
            assert_eq!(info.session.id, s.id);
            assert_eq!(info.session.file_count, 1);
        }
        assert!(!expired_first(
            &c.store
                .get_session("t1", &s.id, Page::FIRST, t)
                .await
                .unwrap()
        ));
        assert!(!expired_first(
            &c.store
                .get_session("t1", &s.id, Page::FIRST, t + 5000)
                .await
                .unwrap()
        ));
        assert!(!expired_first(
            &c.store
                .register_file("t1", &file(&s.id, "b", c.t0), t)
                .await
                .unwrap()
        ));
        assert!(!expired_first(
            &c.store
                .set_upload_id("t1", &s.id, &f.id, "u", t)
                .await
                .unwrap()
        ));
        assert!(!expired_first(
            &c.store
                .record_part("t1", &s.id, &f.id, &part(1, "e", 1), t)
                .await
                .unwrap()
        ));
        assert!(!expired_first(
            &c.store.list_parts("t1", &s.id, &f.id, t).await.unwrap()
        ));
        assert!(!expired_first(
            &c.store
                .begin_complete("t1", &s.id, &f.id, "k", 1000, t)
                .await
                .unwrap()
        ));
        assert!(!expired_first(
            &c.store.abort_file("t1", &s.id, &f.id, t).await.unwrap()
        ));
        assert!(!expired_first(
            &c.store.abort_session("t1", &s.id, t).await.unwrap()
        ));
        assert!(!expired_first(
            &c.store.finalize("t1", &s.id, &[], t).await.unwrap()
        ));
        // Expired gate precedes the file check.
        assert!(!expired_first(
            &c.store
                .get_file("t1", &s.id, "nofile", true, t)
                .await
                .unwrap()
        ));
        // Nothing changed the file.
        assert_eq!(
            c.store.session_deadline("t1", &s.id).await.unwrap(),
            Some((s.expires_at, s.created_at))
        );
        let r = c
            .store
            .reap("t1", &s.id, t)
            .await
            .unwrap()
            .expect("still retained");
        assert!(!r.first_observation);
        assert_eq!(r.session.status, SessionStatus::Expired);
    }

    pub(crate) async fn expired_concurrent_single_observer(c: Ctx) {
        let s = c.session("t1", 5).await;
        let f = c.register("t1", &s, "a").await;
        let t = c.expiry() + 10;
        let tasks = (0..60).map(|i| {
            let st = c.store.clone();
            let (sid, fid) = (s.id.clone(), f.id.clone());
            tokio::spawn(async move {
                let g = match i % 3 {
                    0 => st
                        .get_session("t1", &sid, Page::FIRST, t)
                        .await
                        .unwrap()
                        .map_unit(),
                    1 => st
                        .get_file("t1", &sid, &fid, true, t)
                        .await
                        .unwrap()
                        .map_unit(),
                    _ => st
                        .begin_complete("t1", &sid, &fid, "k", 1000, t)
                        .await
                        .unwrap()
                        .map_unit(),
                };
                expired_first(&g)
            })
        });
        let firsts = join_all(tasks)
            .await
            .into_iter()
            .map(|r| r.unwrap())
            .filter(|b| *b)
            .count();
        assert_eq!(firsts, 1, "exactly one caller observes the expiration");
    }

    pub(crate) async fn not_active_after_finalize(c: Ctx) {
        let s = c.session("t1", 5).await;
        let f = c.completed("t1", &s, "a").await;
        let now = c.now();
        assert!(matches!(
            c.store
                .finalize("t1", &s.id, std::slice::from_ref(&f.id), now)
                .await
                .unwrap(),
            Gate::Ok(Finalized::Done(_))
        ));
        let na = Gate::NotActive(SessionStatus::Finalized);
        assert_eq!(
            c.store
                .register_file("t1", &file(&s.id, "b", c.t0), now)
                .await
                .unwrap(),
            na.clone().map_unit2()
        );
        assert_eq!(
            c.store
                .get_file("t1", &s.id, &f.id, true, now)
                .await
                .unwrap(),
            na.clone().map_unit2()
        );
        assert_eq!(
            c.store
                .get_file("t1", &s.id, &f.id, false, now)
                .await
                .unwrap(),
            Gate::Ok(f.clone())
        );
        assert_eq!(
            c.store
                .set_upload_id("t1", &s.id, &f.id, "u", now)
                .await
                .unwrap(),
            na.clone().map_unit2()
        );
        assert_eq!(
            c.store
                .record_part("t1", &s.id, &f.id, &part(2, "e", 1), now)
                .await
                .unwrap(),
            na.clone().map_unit2()
        );
        assert_eq!(
            c.store.abort_file("t1", &s.id, &f.id, now).await.unwrap(),
            na.clone().map_unit2()
        );
        assert_eq!(
            c.store.finalize("t1", &s.id, &[], now).await.unwrap(),
            na.clone().map_unit2()
        );
        // Reads without the active check still work.
        assert_eq!(
            c.store.list_parts("t1", &s.id, &f.id, now).await.unwrap(),
            Gate::Ok(vec![part(1, "e1", 10)])
        );
        let v = c.get("t1", &s).await;
        assert_eq!(v.session.status, SessionStatus::Finalized);
        // A completed file is AlreadyCompleted whatever the session status.
        assert_eq!(
            c.store
                .begin_complete("t1", &s.id, &f.id, "k", 1000, now)
                .await
                .unwrap(),
            Gate::Ok(BeginComplete::AlreadyCompleted(f))
        );
        // Deleting a finalized session forgets it (API.md v1.1).
        assert_eq!(
            c.store.abort_session("t1", &s.id, now).await.unwrap(),
            Gate::Ok(SessionAborted::Forgotten)
        );
        assert_eq!(
            c.store
                .get_session("t1", &s.id, Page::FIRST, now)
                .await
                .unwrap(),
            Gate::SessionNotFound
        );
    }

    pub(crate) async fn register_uniqueness_and_limit(c: Ctx) {
        let s = c.session("t1", 2).await;
        let a = c.register("t1", &s, "a").await;
        let now = c.now();
        let dup = file(&s.id, "a", c.t0);
        assert_eq!(
            c.store.register_file("t1", &dup, now).await.unwrap(),
            Gate::Ok(Registered::DuplicateKey)
        );
        let b = c.register("t1", &s, "b").await;
        // Duplicate wins over the count check.
        assert_eq!(
            c.store
                .register_file("t1", &file(&s.id, "b", c.t0), now)
                .await
                .unwrap(),
            Gate::Ok(Registered::DuplicateKey)
        );
        assert_eq!(
            c.store
                .register_file("t1", &file(&s.id, "c", c.t0), now)
                .await
                .unwrap(),
            Gate::Ok(Registered::CountExceeded {
                file_limit: 2,
                file_count: 2
            })
        );
        // Aborting frees both the key and the slot.
        let deleted = c.store.abort_file("t1", &s.id, &a.id, now).await.unwrap();
        assert_eq!(
            deleted,
            Gate::Ok(FileAborted::Deleted { cleanup: None }),
            "no storage state: nothing to clean, the key is free at once"
        );
        assert_eq!(
            c.store
                .get_file("t1", &s.id, &a.id, false, now)
                .await
                .unwrap(),
            Gate::FileNotFound,
            "a deleted file is gone"
        );
        assert_eq!(
            c.store.abort_file("t1", &s.id, &a.id, now).await.unwrap(),
            Gate::FileNotFound,
            "nothing queued: deleting it again finds nothing"
        );
        assert_eq!(c.get("t1", &s).await.session.file_count, 1);
        let a2 = c.register("t1", &s, "a").await;
        assert_eq!(
            c.store
                .register_file("t1", &file(&s.id, "c", c.t0), now)
                .await
                .unwrap(),
            Gate::Ok(Registered::CountExceeded {
                file_limit: 2,
                file_count: 2
            })
        );
        let v = c.get("t1", &s).await;
        assert_eq!(v.session.file_count, 2);
        let ids: Vec<_> = v.files.iter().map(|f| (f.id.clone(), f.status)).collect();
        assert_eq!(
            ids,
            vec![
                (b.id.clone(), FileStatus::Registered),
                (a2.id.clone(), FileStatus::Registered)
            ],
            "files in registration order, deleted ones not listed"
        );
        // Same key in another session is independent.
        let s2 = c.session("t1", 2).await;
        c.register("t1", &s2, "a").await;
    }

    /// A file's part size comes from its session (5 MiB here), not from the caller's
    /// assumption (a replica configured with 8 MiB parts during a rolling deploy); a file
    /// too large for 10,000 session-sized parts gets the smallest whole MiB that fits.
    pub(crate) async fn part_size_comes_from_the_session(c: Ctx) {
        const MIB: u64 = 1024 * 1024;
        let s = c.session("t1", 10).await;
        for (key, size, caller_part, want_part, want_count) in [
            ("ps-a", 20 * MIB, 8 * MIB, 5 * MIB, 4),
            ("ps-b", 20 * MIB, 5 * MIB, 5 * MIB, 4),
            ("ps-c", 0, 8 * MIB, 5 * MIB, 1),
            ("ps-d", 60_000 * MIB, 5 * MIB, 6 * MIB, 10_000),
        ] {
            let mut f = file(&s.id, key, c.t0);
            f.size_bytes = size;
            f.part_size_bytes = caller_part;
            f.part_count = upgate::model::part_count(size, caller_part);
            let created = match c.store.register_file("t1", &f, c.now()).await.unwrap() {
                Gate::Ok(Registered::Created(x)) => x,
                other => panic!("{key}: {other:?}"),
            };
            assert_eq!(
                (created.part_size_bytes, created.part_count),
                (want_part, want_count),
                "{key}"
            );
            assert_eq!(
                c.file("t1", &s, &created).await,
                created,
                "{key}: stored as returned"
            );
        }
        assert_eq!(c.get("t1", &s).await.session.file_count, 4);
    }

    pub(crate) async fn abort_file_repeatable(c: Ctx) {
        let s = c.session("t1", 3).await;
        let f = c.register("t1", &s, "a").await;
        let now = c.now();
        assert_eq!(
            c.store
                .set_upload_id("t1", &s.id, &f.id, "up", now)
                .await
                .unwrap(),
            Gate::Ok(UploadIdSet::Stored)
        );
        let tok = "tok";
        assert!(matches!(
            c.store
                .begin_complete("t1", &s.id, &f.id, tok, 60_000, now)
                .await
                .unwrap(),
            Gate::Ok(BeginComplete::Acquired(..))
        ));
        // The completion is in flight (its lease runs): nothing changes.
        assert_eq!(
            c.store.abort_file("t1", &s.id, &f.id, now).await.unwrap(),
            Gate::Ok(FileAborted::CompletionInProgress)
        );
        assert_eq!(c.file("t1", &s, &f).await.status, FileStatus::Completing);
        // Once the lease has run out (the holder died), the abort goes through.
        let later = now + 60_001;
        let want = Cleanup {
            file_id: f.id.clone(),
            object_key: f.object_key.clone(),
            upload_id: Some("up".into()),
        };
        assert_eq!(
            c.store.abort_file("t1", &s.id, &f.id, later).await.unwrap(),
            Gate::Ok(FileAborted::Deleted {
                cleanup: Some(want.clone())
            }),
            "an upload id: its cleanup is queued"
        );
        assert_eq!(
            c.store
                .get_file("t1", &s.id, &f.id, false, later)
                .await
                .unwrap(),
            Gate::FileNotFound,
            "the record is gone at once"
        );
        assert_eq!(
            c.store.list_parts("t1", &s.id, &f.id, later).await.unwrap(),
            Gate::FileNotFound
        );
        assert_eq!(
            c.store.abort_file("t1", &s.id, &f.id, later).await.unwrap(),
            Gate::Ok(FileAborted::Deleted {
                cleanup: Some(want.clone())
            }),
            "still queued: a repeated DELETE drives it again"
        );
        assert_eq!(
            c.get("t1", &s).await.session.file_count,
            0,
            "slot freed once"
        );
        // The key is free at once (object keys carry the file id); the cleanup stays queued.
        let reused = file(&s.id, "a", c.t0);
        assert!(matches!(
            c.store.register_file("t1", &reused, later).await.unwrap(),
            Gate::Ok(Registered::Created(_))
        ));
        let r = c
            .store
            .reap("t1", &s.id, later)
            .await
            .unwrap()
            .expect("exists");
        assert_eq!(r.cleanup, vec![want], "the reaper sees the queued cleanup");
        assert!(r.open_uploads.is_empty(), "not expired");
        c.store
            .cleanup_done("t1", &s.id, std::slice::from_ref(&f.id))
            .await
            .unwrap();
        assert_eq!(
            c.store.abort_file("t1", &s.id, &f.id, later).await.unwrap(),
            Gate::FileNotFound,
            "cleaned: nothing of the file is left"
        );
        let r = c
            .store
            .reap("t1", &s.id, later)
            .await
            .unwrap()
            .expect("exists");
        assert!(r.cleanup.is_empty());
        c.store
            .abort_file("t1", &s.id, &reused.id, later)
            .await
            .unwrap();
        // The old lease holder cannot finish, and nothing else finds the deleted file.
        assert_eq!(
            c.store
                .finish_complete("t1", &s.id, &f.id, tok, "u", "e", 0)
                .await
                .unwrap(),
            Gate::FileNotFound
        );
        assert_eq!(
            c.store
                .begin_complete("t1", &s.id, &f.id, "x", 1000, now)
                .await
                .unwrap(),
            Gate::FileNotFound
        );
        assert_eq!(
            c.store
                .set_upload_id("t1", &s.id, &f.id, "up2", now)
                .await
                .unwrap(),
            Gate::FileNotFound
        );
        assert_eq!(
            c.store
                .record_part("t1", &s.id, &f.id, &part(1, "e", 1), now)
                .await
                .unwrap(),
            Gate::FileNotFound
        );
        assert_eq!(
            c.store.list_parts("t1", &s.id, &f.id, now).await.unwrap(),
            Gate::FileNotFound
        );
    }

    /// Files come in pages of registration order; a cursor stays valid while files are
    /// deleted and registered between pages (nothing is skipped or listed twice); the
    /// first page of a large session is bounded, and finalize embeds the same bound.
    pub(crate) async fn files_are_paged_in_registration_order(c: Ctx) {
        let st = &c.store;
        let s = c.session("t1", 2000).await;
        let mut files = Vec::new();
        for i in 0..7 {
            files.push(c.register("t1", &s, &format!("k{i}")).await);
        }
        let now = c.now();
        let page = |after, limit| Page { after, limit };
        let first = match st
            .get_session("t1", &s.id, page(None, 3), now)
            .await
            .unwrap()
        {
            Gate::Ok(v) => v,
            other => panic!("{other:?}"),
        };
        let ids = |v: &[FileRecord]| v.iter().map(|f| f.id.clone()).collect::<Vec<_>>();
        assert_eq!(ids(&first.files), ids(&files[0..3]));
        let cursor = first.next_cursor.expect("more files follow");
        // Between pages: the page's last file and a later one are deleted, a new one added.
        st.abort_file("t1", &s.id, &files[2].id, now).await.unwrap();
        st.abort_file("t1", &s.id, &files[4].id, now).await.unwrap();
        let late = c.register("t1", &s, "late").await;
        let second = match st
            .get_session("t1", &s.id, page(Some(cursor), 3), now)
            .await
            .unwrap()
        {
            Gate::Ok(v) => v,
            other => panic!("{other:?}"),
        };
        assert_eq!(
            ids(&second.files),
            vec![
                files[3].id.clone(),
                files[5].id.clone(),
                files[6].id.clone()
            ]
        );
        let third = match st
            .get_session("t1", &s.id, page(second.next_cursor, 3), now)
            .await
            .unwrap()
        {
            Gate::Ok(v) => v,
            other => panic!("{other:?}"),
        };
        assert_eq!(ids(&third.files), vec![late.id.clone()]);
        assert_eq!(third.next_cursor, None, "the last page");
        // A page size of exactly what is left has no next page.
        let all = st
            .get_session("t1", &s.id, page(None, 6), now)
            .await
            .unwrap();
        assert!(matches!(all, Gate::Ok(ref v) if v.files.len() == 6 && v.next_cursor.is_none()));
        // Another tenant's session is not found, whatever the page.
        assert_eq!(
            st.get_session("t2", &s.id, page(Some(cursor), 3), now)
                .await
                .unwrap(),
            Gate::SessionNotFound
        );
        // The bound: the first page holds FILES_PAGE_MAX files; finalize embeds as many.
        let big = c.session("t1", 2000).await;
        let mut big_ids = Vec::new();
        for i in 0..(upgate::store::FILES_PAGE_MAX + 5) {
            let f = c.register("t1", &big, &format!("b{i}")).await;
            big_ids.push(f.id);
        }
        let v = c.get("t1", &big).await;
        assert_eq!(v.files.len(), upgate::store::FILES_PAGE_MAX);
        let rest = match st
            .get_session("t1", &big.id, page(v.next_cursor, 1000), now)
            .await
            .unwrap()
        {
            Gate::Ok(v) => v,
            other => panic!("{other:?}"),
        };
        let mut listed = ids(&v.files);
        listed.extend(ids(&rest.files));
        assert_eq!(listed, big_ids, "two pages hold every file once, in order");
        for id in &big_ids {
            assert_eq!(
                st.abort_file("t1", &big.id, id, now).await.unwrap(),
                Gate::Ok(FileAborted::Deleted { cleanup: None })
            );
        }
        let empty = c.get("t1", &big).await;
        assert!(empty.files.is_empty() && empty.next_cursor.is_none());
        assert_eq!(empty.session.file_count, 0);
    }

    pub(crate) async fn upload_id_first_wins(c: Ctx) {
        let s = c.session("t1", 3).await;
        let f = c.register("t1", &s, "a").await;
        let now = c.now();
        assert_eq!(
            c.store
                .set_upload_id("t1", &s.id, &f.id, "u1", now)
                .await
                .unwrap(),
            Gate::Ok(UploadIdSet::Stored)
        );
        assert_eq!(
            c.store
                .set_upload_id("t1", &s.id, &f.id, "u2", now)
                .await
                .unwrap(),
            Gate::Ok(UploadIdSet::Existing("u1".to_owned()))
        );
        assert_eq!(c.file("t1", &s, &f).await.upload_id.as_deref(), Some("u1"));
        // Concurrent: exactly one Stored, the rest see the winner.
        let g = c.register("t1", &s, "b").await;
        let res = join_all((0..30).map(|i| {
            let st = c.store.clone();
            let (sid, fid) = (s.id.clone(), g.id.clone());
            tokio::spawn(async move {
                st.set_upload_id("t1", &sid, &fid, &format!("u{i}"), now)
                    .await
                    .unwrap()
            })
        }))
        .await;
        let res: Vec<_> = res.into_iter().map(|r| r.unwrap()).collect();
        assert_eq!(
            res.iter()
                .filter(|r| **r == Gate::Ok(UploadIdSet::Stored))
                .count(),
            1
        );
        let winner = c.file("t1", &s, &g).await.upload_id.expect("stored");
        for r in res {
            if let Gate::Ok(UploadIdSet::Existing(e)) = r {
                assert_eq!(e, winner);
            }
        }
        // Completed file: not open.
        let done = c.completed("t1", &s, "c").await;
        assert_eq!(
            c.store
                .set_upload_id("t1", &s.id, &done.id, "u9", now)
                .await
                .unwrap(),
            Gate::Ok(UploadIdSet::FileNotOpen(done))
        );
    }

    pub(crate) async fn parts_recorded_sorted_and_replaced(c: Ctx) {
        let s = c.session("t1", 3).await;
        let f = c.register("t1", &s, "a").await;
        let now = c.now();
        for p in [
            part(3, "e3", 3),
            part(1, "e1", 1),
            part(12, "e:12", 12),
            part(2, "e2", 2),
            part(2, "e2b", 22),
        ] {
            let got = c
                .store
                .record_part("t1", &s.id, &f.id, &p, now)
                .await
                .unwrap();
            assert_eq!(got, Gate::Ok(f.clone()));
        }
        assert_eq!(
            c.store.list_parts("t1", &s.id, &f.id, now).await.unwrap(),
            Gate::Ok(vec![
                part(1, "e1", 1),
                part(2, "e2b", 22),
                part(3, "e3", 3),
                part(12, "e:12", 12)
            ])
        );
        // While completing, parts are frozen (file returned unchanged, status completing).
        assert!(matches!(
            c.store.begin_complete("t1", &s.id, &f.id, "k", 60_000, now).await.unwrap(),
            Gate::Ok(BeginComplete::Acquired(_, ref parts)) if parts.len() == 4
        ));
        let got = c
            .store
            .record_part("t1", &s.id, &f.id, &part(4, "e4", 4), now)
            .await
            .unwrap();
        assert!(matches!(got, Gate::Ok(ref ff) if ff.status == FileStatus::Completing));
        match c.store.list_parts("t1", &s.id, &f.id, now).await.unwrap() {
            Gate::Ok(p) => assert_eq!(p.len(), 4),
            other => panic!("{other:?}"),
        }
        // Another file has its own parts.
        let g = c.register("t1", &s, "b").await;
        assert_eq!(
            c.store.list_parts("t1", &s.id, &g.id, now).await.unwrap(),
            Gate::Ok(vec![])
        );
    }

    pub(crate) async fn completion_lease(c: Ctx) {
        let s = c.session("t1", 3).await;
        let f = c.register("t1", &s, "a").await;
        let now = c.now();
        c.store
            .record_part("t1", &s.id, &f.id, &part(2, "b", 2), now)
            .await
            .unwrap();
        c.store
            .record_part("t1", &s.id, &f.id, &part(1, "a", 1), now)
            .await
            .unwrap();
        let st = &c.store;
        let (sid, fid) = (&s.id, &f.id);
        match st
            .begin_complete("t1", sid, fid, "tok1", 10_000, now)
            .await
            .unwrap()
        {
            Gate::Ok(BeginComplete::Acquired(ff, parts)) => {
                assert_eq!(ff.status, FileStatus::Completing);
                assert_eq!(parts, vec![part(1, "a", 1), part(2, "b", 2)]);
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(
            st.begin_complete("t1", sid, fid, "tok2", 10_000, now + 9_999)
                .await
                .unwrap(),
            Gate::Ok(BeginComplete::InProgress)
        );
        // Completing shows as such to readers.
        assert_eq!(c.file("t1", &s, &f).await.status, FileStatus::Completing);
        // Lease ran out: takeover.
        assert!(matches!(
            st.begin_complete("t1", sid, fid, "tok2", 10_000, now + 10_000)
                .await
                .unwrap(),
            Gate::Ok(BeginComplete::Acquired(..))
        ));
        // The old holder lost it: finish is None, release is a no-op.
        assert_eq!(
            st.finish_complete("t1", sid, fid, "tok1", "u1", "e1", 0)
                .await
                .unwrap(),
            Gate::Ok(None)
        );
        st.release_complete("t1", sid, fid, "tok1").await.unwrap();
        assert_eq!(
            st.begin_complete("t1", sid, fid, "tok3", 10_000, now + 10_001)
                .await
                .unwrap(),
            Gate::Ok(BeginComplete::InProgress)
        );
        let done = match st
            .finish_complete("t1", sid, fid, "tok2", "file:///data/a", "etag-a", 0)
            .await
            .unwrap()
        {
            Gate::Ok(Some(d)) => d,
            other => panic!("{other:?}"),
        };
        assert_eq!(done.status, FileStatus::Completed);
        assert_eq!(done.file_url.as_deref(), Some("file:///data/a"));
        assert_eq!(done.etag.as_deref(), Some("etag-a"));
        assert_eq!(c.file("t1", &s, &f).await, done);
        // Afterwards: AlreadyCompleted; finish with any token returns it unchanged.
        assert_eq!(
            st.begin_complete("t1", sid, fid, "tok4", 10_000, now + 20_000)
                .await
                .unwrap(),
            Gate::Ok(BeginComplete::AlreadyCompleted(done.clone()))
        );
        assert_eq!(
            st.finish_complete("t1", sid, fid, "tok1", "other", "other", 0)
                .await
                .unwrap(),
            Gate::Ok(Some(done.clone()))
        );
        st.release_complete("t1", sid, fid, "tok2").await.unwrap();
        assert_eq!(
            c.file("t1", &s, &f).await,
            done,
            "release does not undo a completion"
        );
        // A completed file keeps its slot.
        assert_eq!(c.get("t1", &s).await.session.file_count, 1);
    }

    pub(crate) async fn release_gives_the_lease_back(c: Ctx) {
        let s = c.session("t1", 3).await;
        let f = c.register("t1", &s, "a").await;
        let now = c.now();
        let st = &c.store;
        assert!(matches!(
            st.begin_complete("t1", &s.id, &f.id, "tok1", 60_000, now)
                .await
                .unwrap(),
            Gate::Ok(BeginComplete::Acquired(..))
        ));
        st.release_complete("t1", &s.id, &f.id, "wrong")
            .await
            .unwrap();
        assert_eq!(
            st.begin_complete("t1", &s.id, &f.id, "tok2", 60_000, now)
                .await
                .unwrap(),
            Gate::Ok(BeginComplete::InProgress)
        );
        st.release_complete("t1", &s.id, &f.id, "tok1")
            .await
            .unwrap();
        assert_eq!(c.file("t1", &s, &f).await.status, FileStatus::Registered);
        // Released before completing: finish with the released token fails.
        assert_eq!(
            st.finish_complete("t1", &s.id, &f.id, "tok1", "u", "e", 0)
                .await
                .unwrap(),
            Gate::Ok(None)
        );
        assert!(matches!(
            st.begin_complete("t1", &s.id, &f.id, "tok2", 60_000, now)
                .await
                .unwrap(),
            Gate::Ok(BeginComplete::Acquired(..))
        ));
        // release on unknown session/file is silent.
        st.release_complete("t1", "nosession", &f.id, "tok2")
            .await
            .unwrap();
        st.release_complete("t1", &s.id, "nofile", "tok2")
            .await
            .unwrap();
    }

    pub(crate) async fn finish_complete_ignores_expiry(c: Ctx) {
        let s = c.session("t1", 3).await;
        let f = c.register("t1", &s, "a").await;
        assert!(matches!(
            c.store
                .begin_complete("t1", &s.id, &f.id, "tok", 600_000, c.now())
                .await
                .unwrap(),
            Gate::Ok(BeginComplete::Acquired(..))
        ));
        assert!(expired_first(
            &c.store
                .get_session("t1", &s.id, Page::FIRST, c.expiry())
                .await
                .unwrap()
        ));
        match c
            .store
            .finish_complete("t1", &s.id, &f.id, "tok", "u", "e", 0)
            .await
            .unwrap()
        {
            Gate::Ok(Some(d)) => assert_eq!(d.status, FileStatus::Completed),
            other => panic!("{other:?}"),
        }
        match c
            .store
            .get_session("t1", &s.id, Page::FIRST, c.expiry())
            .await
            .unwrap()
        {
            Gate::Expired(info) => assert!(!info.first_observation),
            other => panic!("{other:?}"),
        }
    }

    pub(crate) async fn abort_session_semantics(c: Ctx) {
        let s = c.session("t1", 10).await;
        let now = c.now();
        let st = &c.store;
        let plain = c.register("t1", &s, "plain").await; // registered, no upload id
        let open = c.register("t1", &s, "open").await; // registered, upload id
        st.set_upload_id("t1", &s.id, &open.id, "u-open", now)
            .await
            .unwrap();
        let busy = c.register("t1", &s, "busy").await; // completing, upload id
        st.set_upload_id("t1", &s.id, &busy.id, "u-busy", now)
            .await
            .unwrap();
        assert!(matches!(
            st.begin_complete("t1", &s.id, &busy.id, "k", 60_000, now)
                .await
                .unwrap(),
            Gate::Ok(BeginComplete::Acquired(..))
        ));
        let done = c.completed("t1", &s, "done").await;
        let gone = c.register("t1", &s, "gone").await;
        st.set_upload_id("t1", &s.id, &gone.id, "u-gone", now)
            .await
            .unwrap();
        st.abort_file("t1", &s.id, &gone.id, now).await.unwrap();

        // A completion in flight (the lease runs): nothing changes.
        assert_eq!(
            st.abort_session("t1", &s.id, now).await.unwrap(),
            Gate::Ok(SessionAborted::CompletionInProgress)
        );
        assert_eq!(c.get("t1", &s).await.session.status, SessionStatus::Active);
        let later = now + 60_001;
        let ids = |queued: &[Cleanup]| {
            let mut v: Vec<_> = queued
                .iter()
                .map(|q| (q.file_id.clone(), q.upload_id.clone()))
                .collect();
            v.sort();
            v
        };
        let queued = match st.abort_session("t1", &s.id, later).await.unwrap() {
            Gate::Ok(SessionAborted::Aborted(v)) => v,
            other => panic!("{other:?}"),
        };
        let mut want = vec![
            (open.id.clone(), Some("u-open".to_owned())),
            (busy.id.clone(), Some("u-busy".to_owned())),
            (done.id.clone(), Some("up-1".to_owned())),
            (gone.id.clone(), Some("u-gone".to_owned())),
        ];
        want.sort();
        assert_eq!(
            ids(&queued),
            want,
            "every file with storage state, the earlier deletion's too"
        );
        // Repeatable: the queued cleanups are reported again until done.
        match st.abort_session("t1", &s.id, later).await.unwrap() {
            Gate::Ok(SessionAborted::Aborted(again)) => assert_eq!(ids(&again), want),
            other => panic!("{other:?}"),
        }
        let v = c.get("t1", &s).await;
        assert_eq!(v.session.status, SessionStatus::Aborted);
        assert_eq!(v.session.file_count, 0, "every slot freed");
        let statuses: Vec<_> = v.files.iter().map(|f| (f.id.clone(), f.status)).collect();
        assert_eq!(
            statuses,
            vec![
                (plain.id, FileStatus::Aborted),
                (open.id, FileStatus::Aborted),
                (busy.id.clone(), FileStatus::Aborted),
                (done.id, FileStatus::Aborted),
            ],
            "the session's files, aborted; the one deleted before is not listed"
        );
        let all: Vec<String> = want.iter().map(|(id, _)| id.clone()).collect();
        st.cleanup_done("t1", &s.id, &all).await.unwrap();
        assert_eq!(
            st.abort_session("t1", &s.id, later).await.unwrap(),
            Gate::Ok(SessionAborted::Aborted(vec![]))
        );
        // A finalized session is forgotten, its objects left alone; but not while a file
        // deleted before finalize still waits for its storage cleanup.
        let fin = c.session("t1", 2).await;
        let dropped = c.register("t1", &fin, "dropped").await;
        st.set_upload_id("t1", &fin.id, &dropped.id, "u-dropped", now)
            .await
            .unwrap();
        st.abort_file("t1", &fin.id, &dropped.id, now)
            .await
            .unwrap();
        st.finalize("t1", &fin.id, &[], now).await.unwrap();
        match st.abort_session("t1", &fin.id, now).await.unwrap() {
            Gate::Ok(SessionAborted::CleanupFirst(q)) => {
                assert_eq!(
                    ids(&q),
                    vec![(dropped.id.clone(), Some("u-dropped".to_owned()))]
                )
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(
            c.get("t1", &fin).await.session.status,
            SessionStatus::Finalized,
            "nothing changed"
        );
        st.cleanup_done("t1", &fin.id, std::slice::from_ref(&dropped.id))
            .await
            .unwrap();
        assert_eq!(
            st.abort_session("t1", &fin.id, now).await.unwrap(),
            Gate::Ok(SessionAborted::Forgotten)
        );
        assert_eq!(
            st.get_session("t1", &fin.id, Page::FIRST, now)
                .await
                .unwrap(),
            Gate::SessionNotFound
        );
        // Mutations are refused, the old lease holder cannot finish.
        assert_eq!(
            st.finish_complete("t1", &s.id, &busy.id, "k", "u", "e", 0)
                .await
                .unwrap(),
            Gate::Ok(None)
        );
        assert_eq!(
            st.finalize("t1", &s.id, &[], now).await.unwrap(),
            Gate::NotActive(SessionStatus::Aborted)
        );
        assert_eq!(
            st.register_file("t1", &file(&s.id, "new", c.t0), now)
                .await
                .unwrap(),
            Gate::NotActive(SessionStatus::Aborted)
        );
        // Abort of an empty session.
        let e = c.session("t1", 1).await;
        assert_eq!(
            st.abort_session("t1", &e.id, now).await.unwrap(),
            Gate::Ok(SessionAborted::Aborted(vec![]))
        );
        assert_eq!(c.get("t1", &e).await.session.status, SessionStatus::Aborted);
    }

    pub(crate) async fn finalize_incomplete_then_done(c: Ctx) {
        let s = c.session("t1", 10).await;
        let now = c.now();
        let st = &c.store;
        let a = c.completed("t1", &s, "a").await;
        let b = c.register("t1", &s, "b").await;
        let d = c.register("t1", &s, "d").await;
        let x = c.register("t1", &s, "x").await;
        st.abort_file("t1", &s.id, &x.id, now).await.unwrap();
        assert!(matches!(
            st.begin_complete("t1", &s.id, &d.id, "k", 60_000, now)
                .await
                .unwrap(),
            Gate::Ok(BeginComplete::Acquired(..))
        ));
        assert_eq!(
            st.finalize("t1", &s.id, &[], now).await.unwrap(),
            Gate::Ok(Finalized::Incomplete(vec![b.id.clone(), d.id.clone()]))
        );
        assert_eq!(
            c.get("t1", &s).await.session.status,
            SessionStatus::Active,
            "nothing changed"
        );
        st.finish_complete("t1", &s.id, &d.id, "k", "u", "e", 0)
            .await
            .unwrap();
        st.abort_file("t1", &s.id, &b.id, now).await.unwrap();
        // A completed file the caller did not check is refused: nothing changes.
        assert_eq!(
            st.finalize("t1", &s.id, std::slice::from_ref(&a.id), now)
                .await
                .unwrap(),
            Gate::Ok(Finalized::Unchecked(vec![d.id.clone()]))
        );
        assert_eq!(c.get("t1", &s).await.session.status, SessionStatus::Active);
        let checked = [a.id.clone(), d.id.clone()];
        let view = match st.finalize("t1", &s.id, &checked, now).await.unwrap() {
            Gate::Ok(Finalized::Done(v)) => v,
            other => panic!("{other:?}"),
        };
        assert_eq!(view.session.status, SessionStatus::Finalized);
        assert_eq!(view.session.file_count, 2);
        let ids: Vec<_> = view.files.iter().map(|f| f.id.clone()).collect();
        assert_eq!(ids, vec![a.id, d.id], "the deleted files are not listed");
        assert_eq!(view.next_cursor, None);
        assert_eq!(view, c.get("t1", &s).await);
        assert_eq!(
            st.finalize("t1", &s.id, &checked, now).await.unwrap(),
            Gate::NotActive(SessionStatus::Finalized)
        );
        // Empty session finalizes.
        let e = c.session("t1", 1).await;
        assert!(
            matches!(st.finalize("t1", &e.id, &[], now).await.unwrap(), Gate::Ok(Finalized::Done(ref v)) if v.files.is_empty())
        );
    }

    pub(crate) async fn claim_expired_and_lease(c: Ctx) {
        let st = &c.store;
        let s1 = c.session_ttl("t1", 1, 10).await;
        let s2 = c.session_ttl("t2", 1, 20).await;
        let s3 = c.session_ttl("t1", 1, 1000).await;
        let k = |s: &SessionRecord| (s.tenant.clone(), s.id.clone());
        assert_eq!(st.claim_expired(c.at(9), 60_000, 10).await.unwrap(), vec![]);
        assert_eq!(st.claim_expired(c.at(30), 60_000, 0).await.unwrap(), vec![]);
        assert_eq!(
            st.claim_expired(c.at(30), 60_000, 10).await.unwrap(),
            vec![k(&s1), k(&s2)],
            "oldest first"
        );
        assert_eq!(
            st.claim_expired(c.at(30), 60_000, 10).await.unwrap(),
            vec![],
            "claimed for the lease"
        );
        assert_eq!(
            st.claim_expired(c.at(89), 60_000, 10).await.unwrap(),
            vec![]
        );
        // Not done within the lease: due again.
        assert_eq!(
            st.claim_expired(c.at(90), 60_000, 1).await.unwrap().len(),
            1,
            "limit"
        );
        let rest = st.claim_expired(c.at(90), 60_000, 10).await.unwrap();
        assert_eq!(rest.len(), 1);
        let claimed = c.at(90) + 60_000;
        st.reap_done("t1", &s1.id, claimed, None).await.unwrap();
        st.reap_done("t1", &s1.id, claimed, None).await.unwrap(); // repeatable
        assert_eq!(
            st.claim_expired(c.at(2000), 60_000, 10).await.unwrap(),
            vec![k(&s2), k(&s3)]
        );
        let claimed = c.at(2000) + 60_000;
        st.reap_done("t2", &s2.id, claimed, None).await.unwrap();
        // Done with a later date: due again then, not before.
        st.reap_done("t1", &s3.id, claimed, Some(c.at(5000)))
            .await
            .unwrap();
        assert_eq!(
            st.claim_expired(c.at(4999), 60_000, 10).await.unwrap(),
            vec![]
        );
        assert_eq!(
            st.claim_expired(c.at(5000), 60_000, 10).await.unwrap(),
            vec![k(&s3)]
        );
        st.reap_done("t1", &s3.id, c.at(5000) + 60_000, None)
            .await
            .unwrap();
        assert_eq!(
            st.claim_expired(c.at(9000), 60_000, 10).await.unwrap(),
            vec![]
        );
    }

    pub(crate) async fn claim_expired_exclusive(c: Ctx) {
        let mut all = HashSet::new();
        for i in 0..40 {
            let s = c
                .session_ttl(if i % 2 == 0 { "ta" } else { "tb" }, 1, 5 + i)
                .await;
            all.insert((s.tenant, s.id));
        }
        let now = c.at(100);
        // Two (and more) replicas claiming at once never share a member.
        for round in 0..3 {
            let t = now + round * 60_000;
            let claims = join_all((0..6).map(|_| {
                let st = c.store.clone();
                tokio::spawn(async move { st.claim_expired(t, 60_000, 9).await.unwrap() })
            }))
            .await;
            let mut seen = HashSet::new();
            let mut total = 0;
            for cl in claims {
                let cl = cl.unwrap();
                assert!(cl.len() <= 9);
                total += cl.len();
                for m in cl {
                    assert!(
                        seen.insert(m.clone()),
                        "claimed twice in one lease window: {m:?}"
                    );
                }
            }
            assert_eq!(
                total, 40,
                "round {round}: every due session claimed exactly once"
            );
            assert_eq!(seen, all);
        }
    }

    pub(crate) async fn reap_semantics(c: Ctx) {
        let st = &c.store;
        let s = c.session("t1", 10).await;
        let now = c.now();
        let plain = c.register("t1", &s, "plain").await;
        let open = c.register("t1", &s, "open").await;
        st.set_upload_id("t1", &s.id, &open.id, "u-open", now)
            .await
            .unwrap();
        let busy = c.register("t1", &s, "busy").await;
        st.set_upload_id("t1", &s.id, &busy.id, "u-busy", now)
            .await
            .unwrap();
        st.begin_complete("t1", &s.id, &busy.id, "k", 60_000, now)
            .await
            .unwrap();
        let _done = c.completed("t1", &s, "done").await;
        let gone = c.register("t1", &s, "gone").await;
        st.set_upload_id("t1", &s.id, &gone.id, "u-gone", now)
            .await
            .unwrap();
        st.abort_file("t1", &s.id, &gone.id, now).await.unwrap();
        let _ = plain;

        // Before expiry: nothing changes, nothing to abort.
        let r = st.reap("t1", &s.id, now).await.unwrap().expect("exists");
        assert!(!r.first_observation);
        assert_eq!(r.session.status, SessionStatus::Active);
        assert!(r.open_uploads.is_empty());

        let r = st
            .reap("t1", &s.id, c.expiry())
            .await
            .unwrap()
            .expect("exists");
        assert!(r.first_observation);
        assert_eq!(r.session.status, SessionStatus::Expired);
        let ids: Vec<_> = r.open_uploads.iter().map(|f| f.id.clone()).collect();
        assert_eq!(ids, vec![open.id.clone(), busy.id.clone()]);
        let r2 = st
            .reap("t1", &s.id, c.expiry() + 1)
            .await
            .unwrap()
            .expect("exists");
        assert!(!r2.first_observation);
        assert_eq!(
            r2.open_uploads, r.open_uploads,
            "repeatable: the uploads are still reported"
        );
        assert!(!expired_first(
            &st.get_session("t1", &s.id, Page::FIRST, c.expiry())
                .await
                .unwrap()
        ));

        // Expired by a request first: the reaper does not observe it again.
        let s2 = c.session("t1", 1).await;
        assert!(expired_first(
            &st.get_session("t1", &s2.id, Page::FIRST, c.expiry())
                .await
                .unwrap()
        ));
        let r = st
            .reap("t1", &s2.id, c.expiry())
            .await
            .unwrap()
            .expect("exists");
        assert!(!r.first_observation);
        // A finalized session past expiry stays finalized.
        let s3 = c.session("t1", 1).await;
        st.finalize("t1", &s3.id, &[], now).await.unwrap();
        let r = st
            .reap("t1", &s3.id, c.expiry())
            .await
            .unwrap()
            .expect("exists");
        assert!(!r.first_observation);
        assert_eq!(r.session.status, SessionStatus::Finalized);
        // Gone.
        assert_eq!(st.reap("t1", "missing", c.expiry()).await.unwrap(), None);
    }

    /// The holder renews its lease; a renewal extends it from the renewal's time; anyone
    /// else's token, a lost lease or an aborted file renews nothing.
    pub(crate) async fn completion_lease_renewal(c: Ctx) {
        let s = c.session("t1", 3).await;
        let f = c.register("t1", &s, "a").await;
        let now = c.now();
        let st = &c.store;
        let (sid, fid) = (&s.id, &f.id);
        assert!(matches!(
            st.begin_complete("t1", sid, fid, "tok1", 10_000, now)
                .await
                .unwrap(),
            Gate::Ok(BeginComplete::Acquired(..))
        ));
        assert!(st
            .renew_complete("t1", sid, fid, "tok1", 10_000, now + 8_000)
            .await
            .unwrap());
        assert!(!st
            .renew_complete("t1", sid, fid, "other", 10_000, now + 8_000)
            .await
            .unwrap());
        // Without the renewal the lease would have run out at +10 s; now it runs to +18 s.
        assert_eq!(
            st.begin_complete("t1", sid, fid, "tok2", 10_000, now + 17_999)
                .await
                .unwrap(),
            Gate::Ok(BeginComplete::InProgress)
        );
        assert_eq!(
            st.abort_file("t1", sid, fid, now + 17_999).await.unwrap(),
            Gate::Ok(FileAborted::CompletionInProgress)
        );
        assert!(matches!(
            st.begin_complete("t1", sid, fid, "tok2", 10_000, now + 18_000)
                .await
                .unwrap(),
            Gate::Ok(BeginComplete::Acquired(..))
        ));
        assert!(
            !st.renew_complete("t1", sid, fid, "tok1", 10_000, now + 18_001)
                .await
                .unwrap(),
            "taken over: the old holder cannot renew"
        );
        st.release_complete("t1", sid, fid, "tok2").await.unwrap();
        assert!(!st
            .renew_complete("t1", sid, fid, "tok2", 10_000, now + 18_002)
            .await
            .unwrap());
        assert!(!st
            .renew_complete("t1", sid, "nofile", "tok2", 10_000, now)
            .await
            .unwrap());
    }

    /// Past expiry a completion in flight is left alone and reported (`busy_until`); once
    /// its lease ran out its upload is reported open. `reap_done` keeps an entry that
    /// `schedule_reap` moved after the claim; `schedule_reap` only ever moves it earlier.
    pub(crate) async fn reap_waits_for_completions_and_keeps_schedules(c: Ctx) {
        let st = &c.store;
        let s = c.session("t1", 10).await;
        let now = c.now();
        let busy = c.register("t1", &s, "busy").await;
        st.set_upload_id("t1", &s.id, &busy.id, "u-busy", now)
            .await
            .unwrap();
        let lease_end = c.expiry() + 5_000;
        st.begin_complete("t1", &s.id, &busy.id, "k", lease_end - now, now)
            .await
            .unwrap();
        let r = st
            .reap("t1", &s.id, c.expiry())
            .await
            .unwrap()
            .expect("exists");
        assert!(r.open_uploads.is_empty(), "the completion may still land");
        assert_eq!(r.busy_until, Some(lease_end));
        let r = st
            .reap("t1", &s.id, lease_end)
            .await
            .unwrap()
            .expect("exists");
        assert_eq!(r.busy_until, None);
        let ids: Vec<_> = r.open_uploads.iter().map(|f| f.id.clone()).collect();
        assert_eq!(ids, vec![busy.id.clone()], "the lease ran out: abort it");

        // Claim, then a schedule moves the entry: the claim's done leaves it.
        let s2 = c.session_ttl("t2", 1, 10).await;
        let claimed_at = c.at(20);
        let due = st.claim_expired(claimed_at, 60_000, 100).await.unwrap();
        assert!(due.contains(&("t2".to_owned(), s2.id.clone())));
        st.schedule_reap("t2", &s2.id, c.at(30)).await.unwrap();
        st.schedule_reap("t2", &s2.id, c.at(40)).await.unwrap(); // later: no effect
        st.reap_done("t2", &s2.id, claimed_at + 60_000, None)
            .await
            .unwrap();
        let again = st.claim_expired(c.at(30), 60_000, 100).await.unwrap();
        assert!(
            again.contains(&("t2".to_owned(), s2.id.clone())),
            "the schedule survived the stale done: {again:?}"
        );
        st.reap_done("t2", &s2.id, c.at(30) + 60_000, None)
            .await
            .unwrap();
        let none = st.claim_expired(c.at(9_000), 60_000, 100).await.unwrap();
        assert!(!none.contains(&("t2".to_owned(), s2.id.clone())));
    }

    /// `max_active_sessions`: a tenant's live sessions are counted up to the limit; a
    /// session stops counting when released (finalized, deleted) or at its expiry; tenants
    /// count apart.
    pub(crate) async fn live_sessions_are_bounded_per_tenant(c: Ctx) {
        let st = &c.store;
        let now = c.now();
        let reserve = |t: &'static str, s: &'static str, until: i64, at: i64| {
            let st = st.clone();
            async move { st.reserve_live(t, s, until, 2, at).await.expect("reserve") }
        };
        assert!(reserve("t1", "a", c.at(100), now).await);
        assert!(reserve("t1", "b", c.at(50), now).await);
        assert!(reserve("t1", "a", c.at(100), now).await, "counted already");
        assert!(!reserve("t1", "c", c.at(100), now).await, "at the limit");
        assert!(reserve("t2", "c", c.at(100), now).await, "another tenant");
        st.release_live("t1", "a").await.unwrap();
        st.release_live("t1", "a").await.unwrap(); // repeatable
        assert!(reserve("t1", "c", c.at(100), now).await, "a released slot");
        assert!(!reserve("t1", "d", c.at(100), now).await);
        assert!(
            reserve("t1", "d", c.at(100), c.at(50)).await,
            "b stops counting at its expiry"
        );
    }

    pub(crate) async fn concurrent_register_respects_limit(c: Ctx) {
        let s = c.session("t1", 50).await;
        let now = c.now();
        let tasks = (0..300).map(|i| {
            let st = c.store.clone();
            let f = file(&s.id, &format!("k{i}"), c.t0);
            tokio::spawn(async move { st.register_file("t1", &f, now).await.unwrap() })
        });
        let res: Vec<_> = join_all(tasks)
            .await
            .into_iter()
            .map(|r| r.unwrap())
            .collect();
        let created = res
            .iter()
            .filter(|r| matches!(r, Gate::Ok(Registered::Created(_))))
            .count();
        let exceeded = res
            .iter()
            .filter(|r| {
                matches!(
                    r,
                    Gate::Ok(Registered::CountExceeded {
                        file_limit: 50,
                        file_count: 50
                    })
                )
            })
            .count();
        assert_eq!((created, exceeded), (50, 250));
        let v = c.get("t1", &s).await;
        assert_eq!(v.files.len(), 50);
        assert_eq!(v.session.file_count, 50);
        let keys: HashSet<_> = v.files.iter().map(|f| f.file_key.clone()).collect();
        assert_eq!(keys.len(), 50);
    }

    pub(crate) async fn concurrent_register_same_key(c: Ctx) {
        let s = c.session("t1", 1000).await;
        let now = c.now();
        let tasks = (0..200).map(|_| {
            let st = c.store.clone();
            let f = file(&s.id, "same/key.bin", c.t0);
            tokio::spawn(async move { st.register_file("t1", &f, now).await.unwrap() })
        });
        let res: Vec<_> = join_all(tasks)
            .await
            .into_iter()
            .map(|r| r.unwrap())
            .collect();
        let created = res
            .iter()
            .filter(|r| matches!(r, Gate::Ok(Registered::Created(_))))
            .count();
        let dup = res
            .iter()
            .filter(|r| matches!(r, Gate::Ok(Registered::DuplicateKey)))
            .count();
        assert_eq!((created, dup), (1, 199));
        let v = c.get("t1", &s).await;
        assert_eq!(v.files.len(), 1);
        assert_eq!(v.session.file_count, 1);
    }

    pub(crate) async fn concurrent_begin_complete_single_winner(c: Ctx) {
        let s = c.session("t1", 5).await;
        let f = c.register("t1", &s, "a").await;
        let now = c.now();
        let tasks = (0..50).map(|i| {
            let st = c.store.clone();
            let (sid, fid) = (s.id.clone(), f.id.clone());
            tokio::spawn(async move {
                st.begin_complete("t1", &sid, &fid, &format!("tok{i}"), 60_000, now)
                    .await
                    .unwrap()
            })
        });
        let res: Vec<_> = join_all(tasks)
            .await
            .into_iter()
            .map(|r| r.unwrap())
            .collect();
        let acquired = res
            .iter()
            .filter(|r| matches!(r, Gate::Ok(BeginComplete::Acquired(..))))
            .count();
        let busy = res
            .iter()
            .filter(|r| matches!(r, Gate::Ok(BeginComplete::InProgress)))
            .count();
        assert_eq!((acquired, busy), (1, 49));
    }

    // --- The outbox ------------------------------------------------------------------

    const KEEP_MS: i64 = 3_600_000;

    /// A session of a tenant with webhooks (its changes are recorded as events).
    async fn hooked(c: &Ctx, tenant: &str) -> SessionRecord {
        let s = SessionRecord {
            outbox_keep_ms: Some(KEEP_MS),
            ..c.session_record(tenant, 5, TTL_S)
        };
        c.store.create_session(&s).await.expect("create_session");
        s
    }

    async fn claim_all(c: &Ctx, tenant: &str, s: &SessionRecord, now: i64) -> ClaimedEvents {
        c.store
            .claim_events(tenant, &s.id, now, 60_000, 100)
            .await
            .expect("claim_events")
    }

    pub(crate) async fn events_record_every_change_in_order(c: Ctx) {
        let s = hooked(&c, "t1").await;
        let kept = c.completed("t1", &s, "a").await;
        let gone = c.register("t1", &s, "b").await;
        assert!(matches!(
            c.store
                .abort_file("t1", &s.id, &gone.id, c.now())
                .await
                .unwrap(),
            Gate::Ok(FileAborted::Deleted { .. })
        ));
        // A repeated DELETE records nothing more.
        let _ = c
            .store
            .abort_file("t1", &s.id, &gone.id, c.now())
            .await
            .unwrap();
        assert!(matches!(
            c.store
                .finalize("t1", &s.id, std::slice::from_ref(&kept.id), c.now())
                .await
                .unwrap(),
            Gate::Ok(Finalized::Done(_))
        ));
        assert_eq!(
            c.store.abort_session("t1", &s.id, c.now()).await.unwrap(),
            Gate::Ok(SessionAborted::Forgotten)
        );
        // A session of a tenant without webhooks records nothing.
        let quiet = c.session("t1", 5).await;
        c.register("t1", &quiet, "q").await;
        let none = claim_all(&c, "t1", &quiet, c.now()).await;
        assert!(none.events.is_empty() && none.pending == 0 && !none.drained);

        let got = claim_all(&c, "t1", &s, c.now()).await;
        let kinds: Vec<&str> = got.events.iter().map(|e| e.kind.as_str()).collect();
        assert_eq!(
            kinds,
            [
                "session.created",
                "file.registered",
                "file.completed",
                "file.registered",
                "file.deleted",
                "session.finalized",
                "session.deleted"
            ]
        );
        let seqs: Vec<u64> = got.events.iter().map(|e| e.sequence).collect();
        assert_eq!(seqs, (1..=7).collect::<Vec<_>>(), "gap-free from 1");
        assert_eq!(got.pending, 7);
        let e = &got.events;
        assert_eq!(e[0].session.id, s.id);
        assert_eq!(e[0].session.status, SessionStatus::Active);
        assert_eq!(
            e[0].session.metadata, s.metadata,
            "the session's copy is whole"
        );
        assert_eq!(
            e[1].file.as_ref().map(|f| f.id.as_str()),
            Some(kept.id.as_str())
        );
        assert_eq!(e[1].session.file_count, 1);
        let done = e[2].file.as_ref().expect("file");
        assert_eq!(done.status, FileStatus::Completed);
        assert_eq!(done.file_url.as_deref(), Some("file:///x"));
        let deleted = e[4].file.as_ref().expect("file");
        assert_eq!(
            (deleted.id.as_str(), deleted.status),
            (gone.id.as_str(), FileStatus::Aborted)
        );
        assert_eq!(
            e[4].session.file_count, 1,
            "the copy is taken after the change"
        );
        assert_eq!(e[5].session.status, SessionStatus::Finalized);
        assert!(e[5].file.is_none());
        assert!(e.iter().all(|e| e.delivery.attempts == 0));
        // The session is forgotten; its events are not, and the outbox drains only once
        // they are delivered.
        assert!(!got.drained);
        for ev in &got.events {
            c.store
                .event_attempted(
                    "t1",
                    &s.id,
                    ev.sequence,
                    &ev.delivery,
                    Attempted::Delivered,
                    c.now(),
                )
                .await
                .unwrap();
        }
        let after = claim_all(&c, "t1", &s, c.at(120)).await;
        assert!(after.events.is_empty());
        assert_eq!(
            (after.pending, after.next_due_ms, after.drained),
            (0, None, true)
        );
    }

    pub(crate) async fn events_expiry_is_recorded_once(c: Ctx) {
        let s = hooked(&c, "t1").await;
        let t = c.expiry();
        assert!(expired_first(
            &c.store
                .get_session("t1", &s.id, Page::FIRST, t)
                .await
                .unwrap()
        ));
        let _ = c
            .store
            .get_session("t1", &s.id, Page::FIRST, t + 1)
            .await
            .unwrap();
        let r = c
            .store
            .reap("t1", &s.id, t + 2)
            .await
            .unwrap()
            .expect("reap");
        assert!(!r.first_observation);
        let other = hooked(&c, "t1").await;
        let r = c
            .store
            .reap("t1", &other.id, t)
            .await
            .unwrap()
            .expect("reap");
        assert!(r.first_observation);
        let _ = c
            .store
            .get_session("t1", &other.id, Page::FIRST, t)
            .await
            .unwrap();
        for (session, how) in [(&s, "a gate"), (&other, "the reaper")] {
            let got = claim_all(&c, "t1", session, t + 5).await;
            let kinds: Vec<&str> = got.events.iter().map(|e| e.kind.as_str()).collect();
            assert_eq!(kinds, ["session.created", "session.expired"], "{how}");
            assert_eq!(got.events[1].session.status, SessionStatus::Expired);
            assert_eq!(got.events[1].at_ms, t.max(got.events[1].at_ms));
        }
    }

    pub(crate) async fn event_claims_lease_retry_and_dead_letter(c: Ctx) {
        let s = hooked(&c, "t1").await;
        let now = c.now();
        let first = claim_all(&c, "t1", &s, now).await;
        assert_eq!(first.events.len(), 1);
        assert_eq!(
            first.next_due_ms,
            Some(now + 60_000),
            "leased until the lease end"
        );
        // Leased: nobody else gets it until the lease ends, then it is due again.
        assert!(claim_all(&c, "t1", &s, now + 59_999)
            .await
            .events
            .is_empty());
        let again = claim_all(&c, "t1", &s, now + 60_000).await;
        assert_eq!(again.events.len(), 1);
        let ev = &again.events[0];
        // A failed attempt: retried at the time given, with its state kept.
        let failed = upgate::events::Delivery {
            attempts: 1,
            last_attempt_ms: Some(now + 60_000),
            last_status: Some(503),
            delivered_to: vec!["aaaa".into()],
            window_start_ms: ev.delivery.window_start_ms,
        };
        c.store
            .event_attempted(
                "t1",
                &s.id,
                1,
                &failed,
                Attempted::RetryAt(now + 90_000),
                now + 60_000,
            )
            .await
            .unwrap();
        assert!(claim_all(&c, "t1", &s, now + 89_999)
            .await
            .events
            .is_empty());
        let retried = claim_all(&c, "t1", &s, now + 90_000).await;
        assert_eq!(retried.events[0].delivery, failed);
        // Dead-lettered: listed as failed, no longer pending, until retried.
        c.store
            .event_attempted("t1", &s.id, 1, &failed, Attempted::Dead, now + 90_000)
            .await
            .unwrap();
        let gone = claim_all(&c, "t1", &s, now + 999_000).await;
        assert!(gone.events.is_empty() && gone.pending == 0);
        let dead = c
            .store
            .list_events("t1", true, None, 10, now)
            .await
            .unwrap();
        assert_eq!(dead.len(), 1);
        assert_eq!(
            dead[0].status,
            upgate::events::EventStatus::Failed(now + 90_000)
        );
        assert_eq!(dead[0].delivery, failed);
        assert!(c
            .store
            .list_events("t1", false, None, 10, now)
            .await
            .unwrap()
            .is_empty());
        assert!(c
            .store
            .list_events("t2", true, None, 10, now)
            .await
            .unwrap()
            .is_empty());
        // An attempt recorded for an event that is not pending changes nothing.
        c.store
            .event_attempted("t1", &s.id, 1, &failed, Attempted::Delivered, now)
            .await
            .unwrap();
        assert_eq!(
            c.store
                .list_events("t1", true, None, 10, now)
                .await
                .unwrap()
                .len(),
            1
        );
        assert!(!c.store.retry_event("t1", &s.id, 2, now).await.unwrap());
        assert!(!c.store.retry_event("t2", &s.id, 1, now).await.unwrap());
        assert!(c
            .store
            .retry_event("t1", &s.id, 1, now + 100_000)
            .await
            .unwrap());
        assert!(!c
            .store
            .retry_event("t1", &s.id, 1, now + 100_000)
            .await
            .unwrap());
        let back = claim_all(&c, "t1", &s, now + 100_000).await;
        assert_eq!(back.events.len(), 1);
        assert_eq!(
            back.events[0].delivery.window_start_ms,
            now + 100_000,
            "a new window"
        );
        assert_eq!(back.events[0].delivery.attempts, 1);
        assert!(c
            .store
            .list_events("t1", true, None, 10, now)
            .await
            .unwrap()
            .is_empty());
    }

    pub(crate) async fn event_index_claims_and_listing(c: Ctx) {
        let now = c.now();
        let a = hooked(&c, "t1").await;
        let b = hooked(&c, "t1").await;
        let _quiet = c.session("t1", 5).await;
        let mut claimed = c
            .store
            .claim_event_sessions("t1", now, 10_000, 10)
            .await
            .unwrap();
        claimed.sort();
        let mut want = vec![a.id.clone(), b.id.clone()];
        want.sort();
        assert_eq!(claimed, want, "sessions with an outbox, due at creation");
        assert!(c
            .store
            .claim_event_sessions("t1", now, 10_000, 10)
            .await
            .unwrap()
            .is_empty());
        assert!(c
            .store
            .claim_event_sessions("t2", now, 10_000, 10)
            .await
            .unwrap()
            .is_empty());
        // Ended with a next time: due then; with none: gone from the index. An end whose
        // claim is stale changes nothing.
        c.store
            .event_session_done("t1", &a.id, now + 10_000, Some(now + 30_000))
            .await
            .unwrap();
        c.store
            .event_session_done("t1", &b.id, now + 10_000, None)
            .await
            .unwrap();
        c.store
            .event_session_done("t1", &a.id, now + 10_000, None)
            .await
            .unwrap();
        assert!(c
            .store
            .claim_event_sessions("t1", now + 29_999, 10_000, 10)
            .await
            .unwrap()
            .is_empty());
        assert_eq!(
            c.store
                .claim_event_sessions("t1", now + 30_000, 10_000, 10)
                .await
                .unwrap(),
            vec![a.id.clone()]
        );
        // Listing: pending events of the sessions in the index, by session then sequence,
        // paged by the last one listed.
        c.register("t1", &a, "x").await;
        let all = c
            .store
            .list_events("t1", false, None, 10, now)
            .await
            .unwrap();
        assert_eq!(all.len(), 2, "b left the index; a has two events");
        assert!(all.iter().all(|e| e.session.id == a.id));
        let one = c
            .store
            .list_events("t1", false, None, 1, now)
            .await
            .unwrap();
        assert_eq!(one[0].sequence, 1);
        let rest = c
            .store
            .list_events("t1", false, Some((&a.id, 1)), 10, now)
            .await
            .unwrap();
        assert_eq!(rest.iter().map(|e| e.sequence).collect::<Vec<_>>(), [2]);
    }
    // =======================================================================================
    // tus
    // =======================================================================================

    fn begin<'a>(token: &'a str, offset: u64) -> TusBegin<'a> {
        TusBegin {
            token,
            lease_ms: 10_000,
            offset,
        }
    }

    fn advance<'a>(
        token: &'a str,
        from: u64,
        to: u64,
        tail_len: u64,
        parts: &'a [PartRecord],
        tail: TailOp<'a>,
    ) -> TusAdvance<'a> {
        TusAdvance {
            token,
            lease_ms: 10_000,
            from,
            to,
            tail_len,
            parts,
            tail,
            length: None,
        }
    }

    pub(crate) async fn tus_lock_is_taken_only_at_the_offset_and_by_one_holder(ctx: Ctx) {
        let s = ctx.session("t1", 10).await;
        let f = ctx.register("t1", &s, "a").await;
        let st = &ctx.store;
        let now = ctx.now();
        match st
            .tus_file("t1", &s.id, &f.id, now)
            .await
            .expect("tus_file")
        {
            Gate::Ok((_, state)) => {
                assert_eq!(state.offset, 0);
                assert!(!state.deferred);
                assert_eq!(state.locked_until, None);
            }
            other => panic!("{other:?}"),
        }
        // Wrong offset: refused, nothing taken.
        assert_eq!(
            st.tus_begin("t1", &s.id, &f.id, &begin("a", 5), now)
                .await
                .expect("begin"),
            Gate::Ok(TusBegun::OffsetMismatch(0))
        );
        assert!(matches!(
            st.tus_begin("t1", &s.id, &f.id, &begin("a", 0), now)
                .await
                .expect("begin"),
            Gate::Ok(TusBegun::Held(..))
        ));
        // A second holder is refused until the lease ends or the lock is given back; the
        // holder itself renews.
        assert_eq!(
            st.tus_begin("t1", &s.id, &f.id, &begin("b", 0), now)
                .await
                .expect("begin"),
            Gate::Ok(TusBegun::Locked)
        );
        assert!(matches!(
            st.tus_begin("t1", &s.id, &f.id, &begin("a", 0), now + 1)
                .await
                .expect("begin"),
            Gate::Ok(TusBegun::Held(..))
        ));
        assert!(matches!(
            st.tus_begin("t1", &s.id, &f.id, &begin("b", 0), now + 10_002)
                .await
                .expect("begin"),
            Gate::Ok(TusBegun::Held(..))
        ));
        st.tus_release("t1", &s.id, &f.id, "a")
            .await
            .expect("release");
        assert_eq!(
            st.tus_begin("t1", &s.id, &f.id, &begin("c", 0), now + 10_003)
                .await
                .expect("begin"),
            Gate::Ok(TusBegun::Locked),
            "a release by a token that no longer holds the lock changes nothing"
        );
        st.tus_release("t1", &s.id, &f.id, "b")
            .await
            .expect("release");
        assert!(matches!(
            st.tus_begin("t1", &s.id, &f.id, &begin("c", 0), now + 10_004)
                .await
                .expect("begin"),
            Gate::Ok(TusBegun::Held(..))
        ));
        // Another tenant: not found.
        assert_eq!(
            st.tus_begin("t2", &s.id, &f.id, &begin("d", 0), now)
                .await
                .expect("begin"),
            Gate::SessionNotFound
        );
        // Concurrent takers: exactly one holds it.
        let g = ctx.register("t1", &s, "b").await;
        let tokens: Vec<String> = (0..16).map(|i| format!("tok{i}")).collect();
        let held = join_all(tokens.iter().map(|t| {
            let st = st.clone();
            let (sid, fid) = (s.id.clone(), g.id.clone());
            async move { st.tus_begin("t1", &sid, &fid, &begin(t, 0), now).await }
        }))
        .await
        .into_iter()
        .filter(|r| matches!(r, Ok(Gate::Ok(TusBegun::Held(..)))))
        .count();
        assert_eq!(held, 1);
    }

    pub(crate) async fn tus_advance_keeps_parts_tail_and_offset_together(ctx: Ctx) {
        let s = ctx.session("t1", 10).await;
        let f = ctx.register("t1", &s, "a").await;
        let st = &ctx.store;
        let now = ctx.now();
        assert!(matches!(
            st.tus_begin("t1", &s.id, &f.id, &begin("a", 0), now)
                .await
                .expect("begin"),
            Gate::Ok(TusBegun::Held(..))
        ));
        let ok = Gate::Ok(TusAdvanced::Done);
        let lost = Gate::Ok(TusAdvanced::Lost);
        // Two appends build the tail (binary bytes kept as they are).
        let a = advance("a", 0, 3, 0, &[], TailOp::Append(&[0, 255, 10]));
        assert_eq!(
            st.tus_advance("t1", &s.id, &f.id, &a, now)
                .await
                .expect("adv"),
            ok
        );
        let b = advance("a", 3, 5, 3, &[], TailOp::Append(b"xy"));
        assert_eq!(
            st.tus_advance("t1", &s.id, &f.id, &b, now)
                .await
                .expect("adv"),
            ok
        );
        assert_eq!(
            st.tus_tail("t1", &s.id, &f.id).await.expect("tail"),
            [0, 255, 10, b'x', b'y']
        );
        // From a stale offset, with a stale tail length, or by another token: nothing changes.
        for bad in [
            advance("a", 3, 9, 5, &[], TailOp::Append(b"zzzz")),
            advance("a", 5, 9, 3, &[], TailOp::Append(b"zzzz")),
            advance("b", 5, 9, 5, &[], TailOp::Append(b"zzzz")),
        ] {
            assert_eq!(
                st.tus_advance("t1", &s.id, &f.id, &bad, now)
                    .await
                    .expect("adv"),
                lost
            );
        }
        // A part made of the tail and new bytes: recorded with the offset; the tail replaced.
        let part = PartRecord {
            part_number: 1,
            etag: "e1".into(),
            size_bytes: 8,
        };
        let c = advance("a", 5, 9, 5, std::slice::from_ref(&part), TailOp::Set(b"q"));
        assert_eq!(
            st.tus_advance("t1", &s.id, &f.id, &c, now)
                .await
                .expect("adv"),
            ok
        );
        assert_eq!(st.tus_tail("t1", &s.id, &f.id).await.expect("tail"), b"q");
        match st.list_parts("t1", &s.id, &f.id, now).await.expect("parts") {
            Gate::Ok(parts) => assert_eq!(parts, vec![part]),
            other => panic!("{other:?}"),
        }
        match st
            .tus_file("t1", &s.id, &f.id, now)
            .await
            .expect("tus_file")
        {
            Gate::Ok((_, state)) => {
                assert_eq!(state.offset, 9);
                assert!(state.locked_until.is_some());
            }
            other => panic!("{other:?}"),
        }
        let d = advance("a", 9, 9, 1, &[], TailOp::Set(b""));
        assert_eq!(
            st.tus_advance("t1", &s.id, &f.id, &d, now)
                .await
                .expect("adv"),
            ok
        );
        assert!(st
            .tus_tail("t1", &s.id, &f.id)
            .await
            .expect("tail")
            .is_empty());
        // Past expiry: the gate refuses.
        assert!(matches!(
            st.tus_advance(
                "t1",
                &s.id,
                &f.id,
                &advance("a", 9, 10, 0, &[], TailOp::Append(b"r")),
                ctx.expiry()
            )
            .await
            .expect("adv"),
            Gate::Expired(_)
        ));
    }

    pub(crate) async fn tus_deferred_length_and_deletion(ctx: Ctx) {
        let s = ctx.session("t1", 10).await;
        let st = &ctx.store;
        let now = ctx.now();
        let mut f = file(&s.id, "deferred", ctx.t0);
        f.size_bytes = 0;
        f.part_count = 1;
        let f = match st
            .register_tus_file("t1", &f, true, now)
            .await
            .expect("register")
        {
            Gate::Ok((Registered::Created(f), expires_at)) => {
                assert_eq!(expires_at, s.expires_at);
                f
            }
            other => panic!("{other:?}"),
        };
        match st
            .tus_file("t1", &s.id, &f.id, now)
            .await
            .expect("tus_file")
        {
            Gate::Ok((_, state)) => assert!(state.deferred),
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            st.tus_begin("t1", &s.id, &f.id, &begin("a", 0), now)
                .await
                .expect("begin"),
            Gate::Ok(TusBegun::Held(..))
        ));
        let mut a = advance("a", 0, 4, 0, &[], TailOp::Append(b"abcd"));
        a.length = Some((12 * 1024 * 1024, 3));
        assert_eq!(
            st.tus_advance("t1", &s.id, &f.id, &a, now)
                .await
                .expect("adv"),
            Gate::Ok(TusAdvanced::Done)
        );
        match st
            .tus_file("t1", &s.id, &f.id, now)
            .await
            .expect("tus_file")
        {
            Gate::Ok((file, state)) => {
                assert!(!state.deferred);
                assert_eq!(file.size_bytes, 12 * 1024 * 1024);
                assert_eq!(file.part_count, 3);
            }
            other => panic!("{other:?}"),
        }
        // A deleted file's tail goes with it.
        assert!(matches!(
            st.abort_file("t1", &s.id, &f.id, now).await.expect("abort"),
            Gate::Ok(FileAborted::Deleted { .. })
        ));
        assert!(st
            .tus_tail("t1", &s.id, &f.id)
            .await
            .expect("tail")
            .is_empty());
        assert_eq!(
            st.tus_begin("t1", &s.id, &f.id, &begin("a", 4), now)
                .await
                .expect("begin"),
            Gate::FileNotFound
        );
    }
}

/// Small helpers to compare gates of different payload types.
trait GateExt {
    fn map_unit(self) -> Gate<()>;
}
impl<T> GateExt for Gate<T> {
    fn map_unit(self) -> Gate<()> {
        match self {
            Gate::Ok(_) => Gate::Ok(()),
            Gate::SessionNotFound => Gate::SessionNotFound,
            Gate::FileNotFound => Gate::FileNotFound,
            Gate::Expired(e) => Gate::Expired(e),
            Gate::NotActive(s) => Gate::NotActive(s),
        }
    }
}
trait GateNoOk {
    fn map_unit2<U>(self) -> Gate<U>;
}
impl GateNoOk for Gate<()> {
    fn map_unit2<U>(self) -> Gate<U> {
        match self {
            Gate::Ok(()) => panic!("not an early gate"),
            Gate::SessionNotFound => Gate::SessionNotFound,
            Gate::FileNotFound => Gate::FileNotFound,
            Gate::Expired(e) => Gate::Expired(e),
            Gate::NotActive(s) => Gate::NotActive(s),
        }
    }
}

macro_rules! for_each_case {
    ($m:ident) => {
        $m!(
            create_get_and_deadline,
            gate_not_found_and_cross_tenant,
            expired_first_observation_exactly_once,
            expired_concurrent_single_observer,
            not_active_after_finalize,
            register_uniqueness_and_limit,
            part_size_comes_from_the_session,
            abort_file_repeatable,
            files_are_paged_in_registration_order,
            upload_id_first_wins,
            parts_recorded_sorted_and_replaced,
            completion_lease,
            completion_lease_renewal,
            release_gives_the_lease_back,
            finish_complete_ignores_expiry,
            abort_session_semantics,
            finalize_incomplete_then_done,
            claim_expired_and_lease,
            claim_expired_exclusive,
            reap_semantics,
            reap_waits_for_completions_and_keeps_schedules,
            live_sessions_are_bounded_per_tenant,
            concurrent_register_respects_limit,
            concurrent_register_same_key,
            concurrent_begin_complete_single_winner,
            events_record_every_change_in_order,
            events_expiry_is_recorded_once,
            event_claims_lease_retry_and_dead_letter,
            event_index_claims_and_listing,
            tus_lock_is_taken_only_at_the_offset_and_by_one_holder,
            tus_advance_keeps_parts_tail_and_offset_together,
            tus_deferred_length_and_deletion
        );
    };
}

// =======================================================================================
// Backends
// =======================================================================================

static PREFIX_SEQ: AtomicU64 = AtomicU64::new(0);

fn unique_prefix() -> String {
    format!(
        "ut{}x{}",
        std::process::id(),
        PREFIX_SEQ.fetch_add(1, Ordering::Relaxed)
    )
}

fn redis_store(handle: RedisHandle, prefix: String) -> RedisStore {
    RedisStore::new(
        handle,
        RedisStoreOptions {
            key_prefix: prefix,
            retention: RETENTION,
            command_timeout: Duration::from_secs(5),
            strict_keys: true,
        },
    )
    .expect("redis store")
}

mod memory {
    use super::*;

    macro_rules! memory_tests {
        ($($name:ident),* $(,)?) => {$(
            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn $name() {
                cases::$name(Ctx::new(Arc::new(MemoryStore::new(RETENTION)))).await;
            }
        )*};
    }
    for_each_case!(memory_tests);
}

mod redis_single {
    use super::*;

    macro_rules! redis_single_tests {
        ($($name:ident),* $(,)?) => {$(
            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn $name() {
                let server = upgate_testkit::RedisServer::start();
                let handle = RedisHandle::single(&server.url()).expect("handle");
                cases::$name(Ctx::new(Arc::new(redis_store(handle, unique_prefix())))).await;
                drop(server);
            }
        )*};
    }
    for_each_case!(redis_single_tests);
}

/// Every case on one shared real 3-master cluster, each under its own key prefix. The
/// cluster lives for the duration of this test only (its processes are killed on drop).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn redis_cluster_all_cases() {
    let cluster = upgate_testkit::RedisCluster::start(3);
    let handle = RedisHandle::cluster(&cluster.urls()).expect("cluster handle");
    assert!(handle.is_cluster());
    let mut failures = Vec::new();
    let mut passed = 0;
    macro_rules! run_cluster {
        ($($name:ident),* $(,)?) => {$(
            let store: Arc<dyn SessionStore> = Arc::new(redis_store(handle.clone(), unique_prefix()));
            let started = Instant::now();
            match tokio::spawn(cases::$name(Ctx::new(store))).await {
                Ok(()) => {
                    passed += 1;
                    eprintln!("cluster case {} ok ({:?})", stringify!($name), started.elapsed());
                }
                Err(e) => failures.push(format!("{}: {e}", stringify!($name))),
            }
        )*};
    }
    for_each_case!(run_cluster);
    assert!(
        failures.is_empty(),
        "cluster cases failed ({passed} passed): {failures:#?}"
    );
    drop(cluster);
}

// =======================================================================================
// Redis-only behaviour
// =======================================================================================

async fn raw_conn(url: &str) -> redis::aio::MultiplexedConnection {
    redis::Client::open(url)
        .expect("client")
        .get_multiplexed_async_connection()
        .await
        .expect("raw connection")
}

/// A session an older build created kept its files in a list: a registration on this layout
/// that creates the order set with a live file count above zero still gives the set the
/// session's retention deadline; and a cleanup entry of the older form is dropped, not a
/// blocker.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_order_set_of_an_older_session_gets_its_retention() {
    let server = upgate_testkit::RedisServer::start();
    let prefix = unique_prefix();
    let store = Arc::new(redis_store(
        RedisHandle::single(&server.url()).unwrap(),
        prefix.clone(),
    ));
    let c = Ctx::new(store.clone());
    let s = c.session("acme", 5).await;
    let base = format!("{prefix}:{{acme:{}}}:", s.id);
    let mut con = raw_conn(&server.url()).await;
    // One file of the older layout: counted, in the old list, no sequence number; and the
    // session without the `ordered` mark this build's sessions carry.
    let _: () = redis::cmd("HSET")
        .arg(format!("{base}s"))
        .arg("file_count")
        .arg(1)
        .query_async(&mut con)
        .await
        .unwrap();
    let _: () = redis::cmd("HDEL")
        .arg(format!("{base}s"))
        .arg("ordered")
        .query_async(&mut con)
        .await
        .unwrap();
    let keep_until = s.expires_at * 1000 + RETENTION.as_millis() as i64;
    let expiry_of_o = || {
        let mut con = con.clone();
        let key = format!("{base}o");
        async move {
            redis::cmd("PEXPIRETIME")
                .arg(key)
                .query_async::<i64>(&mut con)
                .await
                .unwrap()
        }
    };
    let first = c.register("acme", &s, "new").await;
    assert_eq!(expiry_of_o().await, keep_until);
    // Deleting it empties the set (Redis drops it); the next registration makes it again.
    assert_eq!(
        c.store
            .abort_file("acme", &s.id, &first.id, c.now())
            .await
            .unwrap(),
        Gate::Ok(FileAborted::Deleted { cleanup: None })
    );
    c.register("acme", &s, "again").await;
    assert_eq!(expiry_of_o().await, keep_until);

    // A cleanup the older build queued (file id -> fileKey, no object key) cannot be done:
    // it does not hold up forgetting a finalized session.
    let fin = c.session("acme", 5).await;
    let fin_c = format!("{prefix}:{{acme:{}}}:c", fin.id);
    let _: () = redis::cmd("HSET")
        .arg(&fin_c)
        .arg("old-file")
        .arg("old/key.bin")
        .query_async(&mut con)
        .await
        .unwrap();
    assert!(matches!(
        c.store
            .finalize("acme", &fin.id, &[], c.now())
            .await
            .unwrap(),
        Gate::Ok(Finalized::Done(_))
    ));
    assert_eq!(
        c.store
            .abort_session("acme", &fin.id, c.now())
            .await
            .unwrap(),
        Gate::Ok(SessionAborted::Forgotten)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_keys_carry_the_retention_ttl() {
    let server = upgate_testkit::RedisServer::start();
    let prefix = unique_prefix();
    let store = Arc::new(redis_store(
        RedisHandle::single(&server.url()).unwrap(),
        prefix.clone(),
    ));
    let c = Ctx::new(store.clone());
    let s = c.session("acme", 5).await;
    let f = c.register("acme", &s, "a").await;
    c.store
        .record_part("acme", &s.id, &f.id, &part(1, "e", 1), c.now())
        .await
        .unwrap();
    // The same layout as documented in src/store/redis.rs.
    let base = format!("{prefix}:{{acme:{}}}:", s.id);
    assert_eq!(store.session_key("acme", &s.id), format!("{base}s"));
    let keep_until_ms = s.expires_at * 1000 + RETENTION.as_millis() as i64;
    let mut con = raw_conn(&server.url()).await;
    for suffix in [
        "s",
        "keys",
        "o",
        &format!("f:{}", f.id),
        &format!("p:{}", f.id),
    ] {
        let key = format!("{base}{suffix}");
        let at: i64 = redis::cmd("PEXPIRETIME")
            .arg(&key)
            .query_async(&mut con)
            .await
            .unwrap();
        assert_eq!(at, keep_until_ms, "PEXPIRETIME of {key}");
        let pttl: i64 = redis::cmd("PTTL")
            .arg(&key)
            .query_async(&mut con)
            .await
            .unwrap();
        let expected = keep_until_ms - upgate::model::now_ms();
        assert!(
            pttl > 0 && (pttl - expected).abs() < 5_000,
            "PTTL of {key}: {pttl} vs ~{expected}"
        );
    }
    // Aborting the only file empties the fileKey hash; registering again recreates it
    // with the TTL.
    c.store
        .abort_file("acme", &s.id, &f.id, c.now())
        .await
        .unwrap();
    c.register("acme", &s, "b").await;
    let at: i64 = redis::cmd("PEXPIRETIME")
        .arg(format!("{base}keys"))
        .query_async(&mut con)
        .await
        .unwrap();
    assert_eq!(at, keep_until_ms);
    // A registration into a session that already has files: its own keys get the TTL too
    // (checked with every other key below).
    c.register("acme", &s, "c").await;
    // The reaper index member and score.
    let score: Option<i64> = redis::cmd("ZSCORE")
        .arg(store.reap_key())
        .arg(format!("acme:{}", s.id))
        .query_async(&mut con)
        .await
        .unwrap();
    assert_eq!(score, Some(s.expires_at * 1000));
    // No key of this store lacks a TTL, except the reaper index.
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(format!("{prefix}:*"))
        .query_async(&mut con)
        .await
        .unwrap();
    for key in keys {
        let pttl: i64 = redis::cmd("PTTL")
            .arg(&key)
            .query_async(&mut con)
            .await
            .unwrap();
        if key == store.reap_key() {
            assert_eq!(pttl, -1);
        } else {
            assert!(pttl > 0, "{key} has no TTL");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_corrupt_data_is_a_store_error() {
    let server = upgate_testkit::RedisServer::start();
    let prefix = unique_prefix();
    let store = Arc::new(redis_store(
        RedisHandle::single(&server.url()).unwrap(),
        prefix.clone(),
    ));
    let c = Ctx::new(store.clone());
    let s = c.session("acme", 5).await;
    let mut con = raw_conn(&server.url()).await;
    let key = store.session_key("acme", &s.id);
    let _: () = redis::cmd("HSET")
        .arg(&key)
        .arg("status")
        .arg("bogus")
        .query_async(&mut con)
        .await
        .unwrap();
    assert!(c
        .store
        .get_session("acme", &s.id, Page::FIRST, c.now())
        .await
        .is_err());
    let _: () = redis::cmd("HSET")
        .arg(&key)
        .arg("status")
        .arg("active")
        .query_async(&mut con)
        .await
        .unwrap();
    let _: () = redis::cmd("HSET")
        .arg(&key)
        .arg("expires_at")
        .arg("soon")
        .query_async(&mut con)
        .await
        .unwrap();
    assert!(c
        .store
        .get_session("acme", &s.id, Page::FIRST, c.now())
        .await
        .is_err());
    // Wrong type under a session key.
    let _: () = redis::cmd("DEL")
        .arg(&key)
        .query_async(&mut con)
        .await
        .unwrap();
    let _: () = redis::cmd("SET")
        .arg(&key)
        .arg("x")
        .query_async(&mut con)
        .await
        .unwrap();
    assert!(c
        .store
        .get_session("acme", &s.id, Page::FIRST, c.now())
        .await
        .is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_outage_errors_fast_and_recovers() {
    let mut server = upgate_testkit::RedisServer::start();
    let handle = RedisHandle::single(&server.url()).unwrap();
    let timeout = Duration::from_millis(800);
    let store = Arc::new(
        RedisStore::new(
            handle,
            RedisStoreOptions {
                key_prefix: unique_prefix(),
                retention: RETENTION,
                command_timeout: timeout,
                strict_keys: true,
            },
        )
        .unwrap(),
    );
    let c = Ctx::new(store.clone());
    let s = c.session("acme", 5).await;
    c.get("acme", &s).await;

    server.stop();
    for _ in 0..3 {
        let started = Instant::now();
        let r = c
            .store
            .get_session("acme", &s.id, Page::FIRST, c.now())
            .await;
        assert!(r.is_err(), "down: {r:?}");
        assert!(
            started.elapsed() < timeout + Duration::from_secs(2),
            "took {:?}",
            started.elapsed()
        );
        let started = Instant::now();
        assert!(c.store.ping().await.is_err());
        assert!(c.store.create_session(&s).await.is_err());
        assert!(started.elapsed() < 2 * timeout + Duration::from_secs(2));
    }

    server.restart(); // empty: scripts must be reloaded (NOSCRIPT path)
    c.store.ping().await.expect("ping after restart");
    let s2 = c.session("acme", 5).await;
    c.register("acme", &s2, "a").await;
    assert_eq!(c.get("acme", &s2).await.files.len(), 1);
    assert_eq!(
        c.store
            .get_session("acme", &s.id, Page::FIRST, c.now())
            .await
            .unwrap(),
        Gate::SessionNotFound
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_hung_server_times_out() {
    let server = upgate_testkit::RedisServer::start_with(&["--enable-debug-command", "local"]);
    let timeout = Duration::from_millis(500);
    let store = Arc::new(
        RedisStore::new(
            RedisHandle::single(&server.url()).unwrap(),
            RedisStoreOptions {
                key_prefix: unique_prefix(),
                retention: RETENTION,
                command_timeout: timeout,
                strict_keys: true,
            },
        )
        .unwrap(),
    );
    let c = Ctx::new(store.clone());
    let s = c.session("acme", 5).await;
    // Block the server for 4 s from another connection (the raw client's own response
    // timeout gives up earlier; the server keeps sleeping). 4 s leaves room for a slow CI
    // machine: each call below must give up after about `timeout`, far short of the sleep.
    let sleep_for = Duration::from_secs(4);
    let mut con = raw_conn(&server.url()).await;
    let blocked_at = Instant::now();
    let _: redis::RedisResult<()> = redis::cmd("DEBUG")
        .arg("SLEEP")
        .arg(sleep_for.as_secs())
        .query_async(&mut con)
        .await;
    for _ in 0..2 {
        let started = Instant::now();
        let r = c
            .store
            .get_session("acme", &s.id, Page::FIRST, c.now())
            .await;
        assert!(r.is_err(), "{r:?}");
        assert!(
            started.elapsed() < timeout + Duration::from_secs(1),
            "took {:?}",
            started.elapsed()
        );
    }
    assert!(
        blocked_at.elapsed() < sleep_for,
        "server should still be asleep"
    );
    tokio::time::sleep(sleep_for.saturating_sub(blocked_at.elapsed()) + Duration::from_millis(200))
        .await;
    // Awake again: the very next calls succeed by themselves.
    c.get("acme", &s).await;
    c.register("acme", &s, "after").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_handle_is_a_connection_like() {
    let server = upgate_testkit::RedisServer::start();
    let mut handle = RedisHandle::single(&server.url()).unwrap();
    let _: () = redis::cmd("SET")
        .arg("k")
        .arg("v")
        .query_async(&mut handle)
        .await
        .unwrap();
    let (v, n): (String, i64) = redis::pipe()
        .cmd("GET")
        .arg("k")
        .cmd("INCR")
        .arg("n")
        .query_async(&mut handle)
        .await
        .unwrap();
    assert_eq!((v.as_str(), n), ("v", 1));
    assert!(RedisStore::new(
        handle.clone(),
        RedisStoreOptions {
            key_prefix: "a{b".into(),
            ..Default::default()
        }
    )
    .is_err());
    assert!(RedisHandle::cluster(&[]).is_err());
}

/// `create_session` writes the reaper index entry before the session, so a call cut between
/// the two leaves an entry for a session that does not exist. The reaper must drop such an
/// entry (and not fail its pass on it): here one is written by hand, as the cut call would.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_an_index_entry_without_its_session_is_dropped_by_the_reaper() {
    let server = upgate_testkit::RedisServer::start();
    let prefix = unique_prefix();
    let store = Arc::new(redis_store(
        RedisHandle::single(&server.url()).unwrap(),
        prefix.clone(),
    ));
    let mut con = raw_conn(&server.url()).await;
    let _: i64 = redis::cmd("ZADD")
        .arg(store.reap_key())
        .arg(1_000)
        .arg("acme:no-such-session")
        .query_async(&mut con)
        .await
        .unwrap();
    let now = 10_000_000;
    let due = store.claim_expired(now, 60_000, 10).await.unwrap();
    assert_eq!(due, vec![("acme".to_owned(), "no-such-session".to_owned())]);
    assert!(store
        .reap("acme", "no-such-session", now)
        .await
        .unwrap()
        .is_none());
    store
        .reap_done("acme", "no-such-session", now + 60_000, None)
        .await
        .unwrap();
    let left: i64 = redis::cmd("ZCARD")
        .arg(store.reap_key())
        .query_async(&mut con)
        .await
        .unwrap();
    assert_eq!(left, 0, "the dangling entry is gone");
}

async fn cmd<T: redis::FromRedisValue>(
    con: &mut redis::aio::MultiplexedConnection,
    args: &[&str],
) -> T {
    let mut c = redis::cmd(args[0]);
    for a in &args[1..] {
        c.arg(*a);
    }
    c.query_async(con)
        .await
        .unwrap_or_else(|e| panic!("{args:?}: {e}"))
}

/// A raw connection to every cluster node, the slot of `key`, and the index of the node
/// holding that slot's keys.
async fn slot_owner(
    urls: &[String],
    key: &str,
) -> (Vec<redis::aio::MultiplexedConnection>, String, usize) {
    let mut nodes = Vec::new();
    for url in urls {
        nodes.push(raw_conn(url).await);
    }
    let slot: i64 = cmd(&mut nodes[0], &["CLUSTER", "KEYSLOT", key]).await;
    let slot = slot.to_string();
    let mut owner = None;
    for (i, con) in nodes.iter_mut().enumerate() {
        let n: i64 = cmd(con, &["CLUSTER", "COUNTKEYSINSLOT", &slot]).await;
        if n > 0 {
            owner = Some(i);
        }
    }
    (nodes, slot, owner.expect("the slot's owner"))
}

/// During a Redis Cluster slot migration (`rebalance`, which deploy/OPERATIONS.md
/// recommends), keys of one slot move one at a time. Here the hash of the session's one
/// unfinished file has moved while the session's other keys have not: a script that built
/// that key itself would read it as missing and finalize a session with an unfinished file.
/// Declared in `KEYS`, it makes Redis redirect instead; once the slot has moved, finalize
/// sees the unfinished file.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_cluster_finalize_mid_slot_migration_never_runs_on_missing_keys() {
    let cluster = upgate_testkit::RedisCluster::start(3);
    let urls = cluster.urls();
    // Not strict: this is about what Redis does with the keys a script declares.
    let store = Arc::new(
        RedisStore::new(
            RedisHandle::cluster(&urls).expect("cluster handle"),
            RedisStoreOptions {
                key_prefix: unique_prefix(),
                retention: RETENTION,
                command_timeout: Duration::from_secs(5),
                strict_keys: false,
            },
        )
        .expect("store"),
    );
    let c = Ctx::new(store.clone());
    let s = c.session("t1", 10).await;
    let done = c.completed("t1", &s, "done").await;
    let open = c.register("t1", &s, "open").await;
    let session_key = store.session_key("t1", &s.id);
    let open_key = format!(
        "{}f:{}",
        session_key.strip_suffix('s').expect("…:s"),
        open.id
    );

    let (mut nodes, slot, source) = slot_owner(&urls, &session_key).await;
    let target = (source + 1) % nodes.len();
    let source_id: String = cmd(&mut nodes[source], &["CLUSTER", "MYID"]).await;
    let target_id: String = cmd(&mut nodes[target], &["CLUSTER", "MYID"]).await;
    let target_port = urls[target].rsplit(':').next().expect("port").to_owned();
    let _: () = cmd(
        &mut nodes[target],
        &["CLUSTER", "SETSLOT", &slot, "IMPORTING", &source_id],
    )
    .await;
    let _: () = cmd(
        &mut nodes[source],
        &["CLUSTER", "SETSLOT", &slot, "MIGRATING", &target_id],
    )
    .await;
    let _: () = cmd(
        &mut nodes[source],
        &[
            "MIGRATE",
            "127.0.0.1",
            &target_port,
            "",
            "0",
            "5000",
            "KEYS",
            &open_key,
        ],
    )
    .await;

    let now = c.now();
    let mid = store
        .finalize("t1", &s.id, std::slice::from_ref(&done.id), now)
        .await;
    eprintln!("finalize mid-migration: {mid:?}");
    assert!(
        !matches!(mid, Ok(Gate::Ok(Finalized::Done(_)))),
        "finalized with the unfinished file's key mid-migration: {mid:?}"
    );

    // Finish the migration: the rest of the slot's keys, then the slot itself.
    let keys: Vec<String> = cmd(
        &mut nodes[source],
        &["CLUSTER", "GETKEYSINSLOT", &slot, "1000"],
    )
    .await;
    if !keys.is_empty() {
        let mut args = vec![
            "MIGRATE",
            "127.0.0.1",
            &target_port,
            "",
            "0",
            "5000",
            "KEYS",
        ];
        args.extend(keys.iter().map(String::as_str));
        let _: () = cmd(&mut nodes[source], &args).await;
    }
    for con in nodes.iter_mut() {
        let _: () = cmd(con, &["CLUSTER", "SETSLOT", &slot, "NODE", &target_id]).await;
    }
    let after = store
        .finalize("t1", &s.id, std::slice::from_ref(&done.id), now)
        .await
        .expect("finalize after the migration");
    assert_eq!(
        after,
        Gate::Ok(Finalized::Incomplete(vec![open.id.clone()]))
    );
}

/// A Redis Cluster node that stops answering mid-call holds a store call only for the
/// connection's response timeout (300 ms here), not for the store's whole command timeout
/// (20 s here), and calls work again once it answers. `CLIENT PAUSE … WRITE` makes the node
/// hold the script (a write) while it still answers the pool's health-check `PING`, so the
/// connection is handed out and the silence comes after the request was sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_cluster_a_silent_node_fails_calls_at_the_response_timeout() {
    let cluster = upgate_testkit::RedisCluster::start(3);
    let urls = cluster.urls();
    let handle = RedisHandle::cluster_with(
        &urls,
        &upgate::store::redis::RedisPoolOptions {
            max_size: 4,
            timeout: Duration::from_millis(300),
            ..Default::default()
        },
    )
    .expect("cluster handle");
    let store = Arc::new(
        RedisStore::new(
            handle,
            RedisStoreOptions {
                key_prefix: unique_prefix(),
                retention: RETENTION,
                command_timeout: Duration::from_secs(20),
                strict_keys: true,
            },
        )
        .expect("store"),
    );
    let c = Ctx::new(store.clone());
    let s = c.session("t1", 10).await;
    let session_key = store.session_key("t1", &s.id);
    let (mut nodes, _, owner) = slot_owner(&urls, &session_key).await;
    let _: () = cmd(&mut nodes[owner], &["CLIENT", "PAUSE", "6000", "WRITE"]).await;
    let started = Instant::now();
    let during = store.finalize("t1", &s.id, &[], c.now()).await;
    let took = started.elapsed();
    eprintln!("call on a silent node: {during:?} after {took:?}");
    assert!(during.is_err(), "{during:?}");
    assert!(
        took < Duration::from_secs(5),
        "held for {took:?}: the 20 s store timeout, not the 300 ms response timeout"
    );
    let _: () = cmd(&mut nodes[owner], &["CLIENT", "UNPAUSE"]).await;
    let after = store.finalize("t1", &s.id, &[], c.now()).await;
    assert!(
        matches!(after, Ok(Gate::Ok(Finalized::Done(_)))),
        "{after:?}"
    );
}
