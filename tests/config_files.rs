//! The shipped configuration files parse and mean what their comments say.

use upgate::config::{Config, Environment, LogFormat, RedisTarget, StorageTarget};

fn load(path: &str) -> Config {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{path}: {e}"));
    Config::from_toml(&text, |_| None, false).unwrap_or_else(|e| panic!("{path}: {e}"))
}

#[test]
fn commented_default_config_matches_the_embedded_defaults() {
    let c = load("config/upgate.toml");
    let d = Config::embedded_default().unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(c.environment, Environment::Development);
    assert_eq!((c.listen, c.admin_listen), (d.listen, d.admin_listen));
    assert_eq!(c.storage, d.storage);
    assert_eq!(c.part_size_mb, d.part_size_mb);
    assert_eq!(c.idempotency_ttl, d.idempotency_ttl);
    assert_eq!(c.reaper_interval, d.reaper_interval);
    assert_eq!(
        c.tenants[0].api_keys_sha256,
        vec![Config::hash_key("acme-dev-key")]
    );
}

/// The example is production-shaped, but its API keys are published here: as shipped it is
/// refused (every sample key named), and with the tenants' own key digests it is valid.
#[test]
fn multi_tenant_example_is_a_valid_production_config_once_its_sample_keys_are_replaced() {
    let path = "config/multi-tenant.example.toml";
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{path}: {e}"));
    let err = Config::from_toml(&text, |_| None, false).expect_err("sample keys in production");
    let msg = err.to_string();
    for key in ["acme-prod-key-1", "acme-prod-key-2", "globex-key"] {
        assert!(msg.contains(key), "{key} not named: {msg}");
    }
    let mut own = text.clone();
    for (sample, mine) in [
        ("acme-prod-key-1", "acme-own-key-1"),
        ("acme-prod-key-2", "acme-own-key-2"),
        ("globex-key", "globex-own-key"),
    ] {
        own = own.replace(&Config::hash_key(sample), &Config::hash_key(mine));
    }
    let c = Config::from_toml(&own, |_| None, false).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(c.environment, Environment::Production);
    assert_eq!(c.log_format, LogFormat::Json);
    assert!(matches!(c.redis, Some(RedisTarget::Single(_))));
    assert!(
        matches!(c.storage, StorageTarget::S3 { ref bucket, ref prefix } if bucket == "uploads-bucket" && prefix == "incoming")
    );
    assert_eq!(c.tenants.len(), 2);
    assert_eq!(c.tenants[1].storage_prefix, "globex/");
    assert!(c.tenants[0]
        .api_keys_sha256
        .contains(&Config::hash_key("acme-own-key-2")));
}
