//! `upgate dev-seed`: creates the seed story's fixtures in the configured store and prints
//! their ids, for the `.http` request files in `config/http/`.
//!
//! Fixtures (all for the first configured tenant):
//! * an expired session (created with a deadline already in the past);
//! * a session with `maxFiles` 2;
//! * a session with one completed 11-byte text file.

use std::sync::Arc;

use crate::config::Config;
use crate::model::{
    now_ms, part_count, part_size_for, FileRecord, FileStatus, SessionRecord, SessionStatus,
};
use crate::storage::PartBody;
use crate::store::{BeginComplete, Gate, Registered};
use crate::{Gateway, StartError};

fn session(
    config: &Config,
    tenant: &str,
    max_files: Option<u32>,
    created_at: i64,
    ttl: i64,
) -> SessionRecord {
    SessionRecord {
        id: uuid::Uuid::new_v4().to_string(),
        tenant: tenant.to_owned(),
        status: SessionStatus::Active,
        part_size_bytes: config.part_size_bytes(),
        max_files,
        file_limit: max_files.unwrap_or(1000),
        file_count: 0,
        created_at,
        expires_at: created_at + ttl,
        metadata: serde_json::json!({"fixture": true}),
        owner: None,
        max_file_size_bytes: None,
        allowed_content_types: None,
        outbox_keep_ms: None,
    }
}

fn backend(e: impl std::fmt::Display) -> StartError {
    StartError::Backend(e.to_string())
}

/// Creates the fixtures and prints `NAME=id` lines.
pub async fn run(config: Config) -> Result<(), StartError> {
    let tenant = config
        .tenants
        .first()
        .cloned()
        .ok_or_else(|| StartError::Backend("no tenant configured".into()))?;
    let gw = Gateway::from_config(config.clone()).await?;
    let state = gw.state();
    let store: &Arc<dyn crate::store::SessionStore> = &state.store;
    let now = now_ms() / 1000;

    let expired = session(&config, &tenant.id, None, now - 3_600, 60);
    store.create_session(&expired).await.map_err(backend)?;

    let limited = session(&config, &tenant.id, Some(2), now, 86_400);
    store.create_session(&limited).await.map_err(backend)?;

    let done = session(&config, &tenant.id, None, now, 86_400);
    store.create_session(&done).await.map_err(backend)?;
    let bytes = bytes::Bytes::from_static(b"hello world");
    let size = bytes.len() as u64;
    let part_size = part_size_for(config.part_size_bytes(), size);
    let key = "fixtures/hello.txt";
    let file_id = uuid::Uuid::new_v4().to_string();
    let tenant_storage = state.storages.for_tenant(&tenant.id);
    let storage = &tenant_storage.store;
    let object_key = storage.object_key(&tenant.storage_prefix, &done.id, &file_id, key);
    let attrs = crate::storage::ObjectAttributes::new(
        &tenant_storage.objects,
        "hello.txt",
        Some("text/plain"),
        &Default::default(),
    );
    let upload_id = storage
        .create_upload(&object_key, &attrs)
        .await
        .map_err(backend)?;
    let file = FileRecord {
        id: file_id,
        session_id: done.id.clone(),
        file_key: key.to_owned(),
        file_name: "hello.txt".to_owned(),
        size_bytes: size,
        content_type: Some("text/plain".to_owned()),
        status: FileStatus::Registered,
        part_size_bytes: part_size,
        part_count: part_count(size, part_size),
        created_at: now,
        object_key: object_key.clone(),
        upload_id: Some(upload_id.clone()),
        file_url: None,
        etag: None,
        metadata: Default::default(),
        tus_form: None,
    };
    let ms = now_ms();
    match store
        .register_file(&tenant.id, &file, ms)
        .await
        .map_err(backend)?
    {
        Gate::Ok(Registered::Created(_)) => {}
        other => return Err(backend(format!("registering the fixture file: {other:?}"))),
    }
    let body = PartBody {
        stream: Box::pin(futures_util::stream::iter([Ok(bytes)])),
        len: size,
        offset: Some(0),
    };
    let etag = storage
        .put_part(&object_key, &upload_id, 1, body, None)
        .await
        .map_err(backend)?;
    let token = uuid::Uuid::new_v4().to_string();
    match store
        .begin_complete(&tenant.id, &done.id, &file.id, &token, 60_000, ms)
        .await
        .map_err(backend)?
    {
        Gate::Ok(BeginComplete::Acquired(..)) => {}
        other => return Err(backend(format!("completing the fixture file: {other:?}"))),
    }
    let object_etag = storage
        .complete_upload(&object_key, &upload_id, &[(1, etag)])
        .await
        .map_err(backend)?;
    let url = storage.file_url(&object_key);
    store
        .finish_complete(
            &tenant.id,
            &done.id,
            &file.id,
            &token,
            &url,
            &object_etag,
            ms,
        )
        .await
        .map_err(backend)?;

    println!("TENANT={}", tenant.id);
    println!("EXPIRED_SESSION_ID={}", expired.id);
    println!("LIMITED_SESSION_ID={}", limited.id);
    println!("COMPLETED_SESSION_ID={}", done.id);
    println!("COMPLETED_FILE_ID={}", file.id);
    if config.redis.is_none() {
        eprintln!("note: the in-memory store forgets these when this process exits; point UPGATE_REDIS_URL at Redis to keep them for a running gateway");
    }
    Ok(())
}
