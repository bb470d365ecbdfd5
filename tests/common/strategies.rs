//! proptest strategies shared by the fuzz tests.

use proptest::prelude::*;
use serde_json::Value;

/// JSON values near the API's request shapes: objects whose keys are mostly the API's field
/// names, with any JSON below them (large and negative numbers, odd strings, nesting).
pub fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        any::<f64>()
            .prop_filter("finite", |f| f.is_finite())
            .prop_map(Value::from),
        "\\PC{0,24}".prop_map(Value::from),
    ];
    leaf.prop_recursive(3, 32, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..5).prop_map(Value::Array),
            prop::collection::btree_map(
                prop_oneof![
                    Just("fileName".to_owned()),
                    Just("fileKey".to_owned()),
                    Just("sizeBytes".to_owned()),
                    Just("contentType".to_owned()),
                    Just("maxFiles".to_owned()),
                    Just("ttlSeconds".to_owned()),
                    Just("metadata".to_owned()),
                    Just("parts".to_owned()),
                    Just("partNumber".to_owned()),
                    Just("partNumbers".to_owned()),
                    Just("etag".to_owned()),
                    "[a-zA-Z]{1,10}",
                ],
                inner,
                0..6
            )
            .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}
