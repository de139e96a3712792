//! Keeps `api/openapi.json` true: every documented operation is called on a real node, and
//! its answer must be one of the documented statuses with the documented required fields.

mod common;

use std::net::SocketAddr;

use common::*;
use serde_json::Value;

fn call(api: SocketAddr, method: &str, path: &str, key: Option<&str>, body: &str) -> (u16, String) {
    http_text(api, &method.to_uppercase(), path, key, body.as_bytes())
}

/// Follows a local `$ref` (`#/components/...`).
fn resolve<'a>(doc: &'a Value, value: &'a Value) -> &'a Value {
    match value["$ref"].as_str() {
        Some(reference) => doc
            .pointer(reference.trim_start_matches('#'))
            .unwrap_or_else(|| panic!("dangling $ref {reference}")),
        None => value,
    }
}

#[test]
fn every_documented_operation_answers_as_documented() {
    let doc: Value =
        serde_json::from_str(include_str!("../api/openapi.json")).expect("openapi json");
    let mut config = dev_config();
    config.dev = false;
    config.api_key = Some("doc-key".into());
    let node = TestNode::start(config);
    let api = node.node().api_addr();
    let mut checked = 0;
    for (path, operations) in doc["paths"].as_object().expect("paths") {
        for (method, operation) in operations.as_object().expect("operations") {
            let mut concrete = path.clone();
            let mut query = Vec::new();
            for parameter in operation["parameters"].as_array().into_iter().flatten() {
                let name = parameter["name"].as_str().expect("name");
                let example = parameter["example"].as_str().expect("parameter example");
                match parameter["in"].as_str() {
                    Some("query") => query.push(format!("{name}={example}")),
                    _ => concrete = concrete.replace(&format!("{{{name}}}"), example),
                }
            }
            if !query.is_empty() {
                concrete = format!("{concrete}?{}", query.join("&"));
            }
            let body = operation
                .pointer("/requestBody/content/application~1json/example")
                .map(Value::to_string)
                .unwrap_or_default();
            let responses = &operation["responses"];
            let (status, reply) = call(api, method, &concrete, Some("doc-key"), &body);
            let documented = resolve(&doc, &responses[status.to_string()]);
            assert!(
                !documented.is_null(),
                "{method} {path}: status {status} is not documented: {reply}"
            );
            if let Some(schema) = documented.pointer("/content/application~1json/schema") {
                let schema = resolve(&doc, schema);
                let reply: Value = serde_json::from_str(&reply).expect("JSON body");
                let item = if schema["type"] == "array" {
                    &reply[0]
                } else {
                    &reply
                };
                let item_schema = if schema["type"] == "array" {
                    &schema["items"]
                } else {
                    schema
                };
                for field in item_schema["required"].as_array().into_iter().flatten() {
                    let field = field.as_str().expect("field");
                    assert!(
                        !item[field].is_null(),
                        "{method} {path}: reply lacks {field}: {reply}"
                    );
                }
            }
            let public = operation["security"].as_array().is_some_and(Vec::is_empty);
            if !public {
                let (status, _) = call(api, method, &concrete, None, &body);
                assert_eq!(status, 401, "{method} {path} without a key");
                assert!(
                    responses["401"].is_object(),
                    "{method} {path}: 401 undocumented"
                );
            }
            checked += 1;
        }
    }
    assert_eq!(checked, 10, "every operation was called");
}
