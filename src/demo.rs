//! The demo a `--dev` node serves on its client port: `GET /` is a small live-room page
//! built on the JavaScript SDK (`clients/js`), `GET /shardcast.js` the SDK as one ES module.
//! It is the README's first experience after `shardcast serve --dev`: open the page in two
//! tabs, join a room, chat, see who is there, and message the other tab directly.
//!
//! Both files are compiled into the binary (`src/demo/`). `shardcast.js` is generated from
//! the SDK's sources by `clients/js/scripts/bundle.js --write-demo`; the SDK's test script
//! fails when the committed copy differs from a fresh bundle, so the page never runs a
//! stale SDK. A production node (no `--dev`) serves neither: its client port answers only
//! WebSocket upgrades.

/// The page.
const INDEX_HTML: &str = include_str!("demo/index.html");

/// The SDK, bundled into one minified ES module.
const SDK_JS: &str = include_str!("demo/shardcast.js");

/// The complete HTTP response to a `GET` of a demo path (the request's head, as read), or
/// `None` when the request is anything else.
pub(crate) fn response(request: &[u8]) -> Option<Vec<u8>> {
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut parsed = httparse::Request::new(&mut headers);
    parsed.parse(request).ok()?;
    if parsed.method != Some("GET") {
        return None;
    }
    let path = parsed.path?.split('?').next()?;
    let (content_type, body) = match path {
        "/" | "/index.html" => ("text/html; charset=utf-8", INDEX_HTML),
        "/shardcast.js" => ("text/javascript; charset=utf-8", SDK_JS),
        _ => return None,
    };
    let mut response = format!(
        "HTTP/1.1 200 OK\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nCache-Control: no-store\r\nConnection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    response.extend_from_slice(body.as_bytes());
    Some(response)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serves_the_page_and_the_sdk_and_nothing_else() {
        let page = response(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").expect("page");
        let page = String::from_utf8(page).expect("utf8");
        assert!(page.starts_with("HTTP/1.1 200 OK\r\nContent-Type: text/html"));
        assert!(page.contains("from \"/shardcast.js\""));
        let sdk = response(b"GET /shardcast.js?v=1 HTTP/1.1\r\n\r\n").expect("sdk");
        assert!(String::from_utf8_lossy(&sdk).contains("text/javascript"));
        assert!(response(b"GET /ws HTTP/1.1\r\n\r\n").is_none());
        assert!(response(b"POST / HTTP/1.1\r\n\r\n").is_none());
        assert!(response(b"GET /../etc/passwd HTTP/1.1\r\n\r\n").is_none());
    }
}
