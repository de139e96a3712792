mod common;
use common::*;
use serde_json::json;

#[test]
fn hello_and_ping() {
    let node = TestNode::start(dev_config());
    let mut c = Client::dev(&node, "alice");
    assert_eq!(c.hello["user"], "alice");
    assert_eq!(c.request(json!({"op":"ping","id":1})), json!({"op":"pong","id":1}));
}
