//! Malformed, oversized and hostile requests get clear errors and never stop the server.

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::{TEST_BODY_LIMIT, TestServer};

/// Sends `POST /v1/topics/t/records` with `rest` after the Host header over a bare connection
/// (so the body can lie about its length or stall), and returns the first reply bytes.
async fn send_raw(server: &TestServer, rest: &str) -> String {
    let addr = server.base.trim_start_matches("http://").to_owned();
    let mut stream = tokio::net::TcpStream::connect(&addr).await.unwrap();
    let head = format!("POST /v1/topics/t/records HTTP/1.1\r\nHost: {addr}\r\n{rest}");
    stream.write_all(head.as_bytes()).await.unwrap();
    let mut buf = vec![0u8; 4096];
    let read = tokio::time::timeout(std::time::Duration::from_secs(10), stream.read(&mut buf));
    let n = read.await.unwrap().unwrap();
    String::from_utf8_lossy(&buf[..n]).into_owned()
}

async fn error_of(response: reqwest::Response) -> (u16, serde_json::Value) {
    let status = response.status().as_u16();
    (
        status,
        response.json::<serde_json::Value>().await.unwrap()["error"].clone(),
    )
}

#[tokio::test]
async fn a_malformed_line_rejects_the_whole_request_and_says_where() {
    let server = TestServer::start().await;
    server.create("t", 2).await;
    let (status, error) = error_of(
        server
            .post("t", "{\"ok\":1}\n{\"ok\":2}\n{\"bad\" 3}\n")
            .await,
    )
    .await;
    assert_eq!(status, 400);
    assert_eq!(error["code"], "malformed_record");
    assert_eq!(error["line"], 3);
    assert_eq!(error["byte_offset"], 25);
    assert!(
        error["message"]
            .as_str()
            .unwrap()
            .starts_with("line 3 (byte 25): invalid JSON"),
        "{error}"
    );
    let info = server.get_json("/v1/topics/t").await;
    let total: u64 = info["partitions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["visible_offset"].as_u64().unwrap())
        .sum();
    assert_eq!(
        total, 0,
        "all or nothing: the good lines were not appended either"
    );

    let (status, error) = error_of(server.post("t", b"\"\xff\xfe\"\n".to_vec()).await).await;
    assert_eq!(status, 400);
    assert_eq!(error["line"], 1);
    let (status, _) = error_of(
        server
            .post("t", format!("{}1{}\n", "[".repeat(5000), "]".repeat(5000)))
            .await,
    )
    .await;
    assert_eq!(status, 400);
    // Still serving.
    assert_eq!(server.post("t", "{\"ok\":3}\n").await.status(), 200);
    server.stop().await;
}

#[tokio::test]
async fn an_unknown_topic_is_404_and_lists_the_topics() {
    let server = TestServer::start().await;
    server.create("orders", 1).await;
    server.create("payments", 1).await;
    let (status, error) = error_of(server.post("order", "{}\n").await).await;
    assert_eq!(status, 404);
    assert_eq!(
        error["message"],
        "unknown topic `order`; topics are: orders, payments"
    );
    assert_eq!(error["topics"], serde_json::json!(["orders", "payments"]));
    // Path tricks name no file: they reach the topic lookup and are just unknown topics.
    for path in ["..%2F..%2Fetc", "%2E%2E%2Fx", "a%00b", "%2Ftmp"] {
        let (status, error) = error_of(server.post(path, "{}\n").await).await;
        assert_eq!(
            (status, error["code"].as_str().unwrap()),
            (404, "unknown_topic"),
            "{path}: {error}"
        );
    }
    let response = reqwest::get(format!(
        "{}/v1/topics/orders/partitions/7/records",
        server.base
    ))
    .await
    .unwrap();
    let (status, error) = error_of(response).await;
    assert_eq!(
        (status, error["code"].as_str().unwrap()),
        (404, "unknown_partition")
    );
    server.stop().await;
}

#[tokio::test]
async fn bad_topic_names_are_refused_by_name() {
    let server = TestServer::start().await;
    let long = "x".repeat(250);
    for (name, needle) in [
        ("a/b", "`/` at byte 1"),
        ("..", "reserved"),
        ("a\0b", "NUL at byte 1"),
        (long.as_str(), "250 bytes"),
    ] {
        let (status, error) = error_of(server.create(name, 1).await).await;
        assert_eq!(status, 400, "{name:?}");
        assert_eq!(error["code"], "invalid_topic_name");
        assert!(
            error["message"].as_str().unwrap().contains(needle),
            "{name:?}: {error}"
        );
    }
    let (status, _) = error_of(server.create("fine", 0).await).await;
    assert_eq!(status, 400);
    assert_eq!(server.create("fine", 1).await.status(), 201);
    let (status, error) = error_of(server.create("fine", 1).await).await;
    assert_eq!(
        (status, error["code"].as_str().unwrap()),
        (409, "topic_exists")
    );
    server.stop().await;
}

#[tokio::test]
async fn a_body_over_the_limit_is_413_before_it_is_read() {
    let server = TestServer::start().await;
    server.create("t", 1).await;
    // Declared too large: refused after the headers, with the body never sent.
    let reply = send_raw(&server, &format!("Content-Length: {}\r\n\r\n", 1u64 << 40)).await;
    assert!(reply.starts_with("HTTP/1.1 413"), "{reply}");
    assert!(reply.contains("body_too_large"), "{reply}");

    // Streamed without a length: cut off once it passes the limit.
    let line = "{\"pad\":\"".to_owned() + &"x".repeat(1000) + "\"}\n";
    let chunks: Vec<Result<String, std::io::Error>> = (0..TEST_BODY_LIMIT / line.len() + 10)
        .map(|_| Ok(line.clone()))
        .collect();
    let body = reqwest::Body::wrap_stream(futures_stream(chunks));
    let (status, error) = error_of(server.post("t", body).await).await;
    assert_eq!(status, 413);
    assert!(
        error["message"]
            .as_str()
            .unwrap()
            .contains("over the limit of 65536 bytes"),
        "{error}"
    );
    assert_eq!(
        server.get_json("/v1/topics/t").await["partitions"][0]["visible_offset"],
        0
    );
    // Just under the limit is fine.
    let fits = line.repeat(TEST_BODY_LIMIT / line.len());
    assert_eq!(server.post("t", fits).await.status(), 200);
    server.stop().await;
}

fn futures_stream(
    items: Vec<Result<String, std::io::Error>>,
) -> impl futures_core::Stream<Item = Result<String, std::io::Error>> {
    struct Iter(std::vec::IntoIter<Result<String, std::io::Error>>);
    impl futures_core::Stream for Iter {
        type Item = Result<String, std::io::Error>;
        fn poll_next(
            mut self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<Option<Self::Item>> {
            std::task::Poll::Ready(self.0.next())
        }
    }
    Iter(items.into_iter())
}

#[tokio::test]
async fn bad_query_parameters_are_400() {
    let server = TestServer::start().await;
    server.create("t", 1).await;
    let response = reqwest::get(format!(
        "{}/v1/topics/t/partitions/0/records?offset=1&from=end",
        server.base
    ))
    .await
    .unwrap();
    assert_eq!(response.status(), 400);
    let response = reqwest::get(format!(
        "{}/v1/topics/t/partitions/0/records?offset=9",
        server.base
    ))
    .await
    .unwrap();
    let (status, error) = error_of(response).await;
    assert_eq!(
        (status, error["code"].as_str().unwrap()),
        (400, "offset_out_of_range")
    );
    let response = reqwest::get(format!("{}/v1/nothing", server.base))
        .await
        .unwrap();
    assert_eq!(response.status(), 404);
    // axum's own rejections come in the API's error shape too.
    for url in [
        format!("{}/v1/topics/t/partitions/abc/records", server.base),
        format!("{}/v1/topics/t/partitions/0/records?offset=-1", server.base),
        format!(
            "{}/v1/topics/t/partitions/0/records?colour=red",
            server.base
        ),
    ] {
        let (status, error) = error_of(reqwest::get(&url).await.unwrap()).await;
        assert_eq!(
            (status, error["code"].as_str().unwrap()),
            (400, "bad_request"),
            "{url}: {error}"
        );
    }
    let response = reqwest::Client::new()
        .delete(format!("{}/v1/topics", server.base))
        .send()
        .await
        .unwrap();
    let (status, error) = error_of(response).await;
    assert_eq!(
        (status, error["code"].as_str().unwrap()),
        (405, "method_not_allowed")
    );
    server.stop().await;
}

#[tokio::test]
async fn a_stalled_body_is_408_and_the_server_keeps_serving() {
    let server = TestServer::start().await;
    server.create("t", 1).await;
    let started = std::time::Instant::now();
    let reply = send_raw(&server, "Content-Length: 100\r\n\r\n{\"a\":").await;
    assert!(reply.starts_with("HTTP/1.1 408"), "{reply}");
    assert!(reply.contains("did not arrive within 500 ms"), "{reply}");
    assert!(started.elapsed() < std::time::Duration::from_secs(5));
    assert_eq!(server.post("t", "{\"ok\":1}\n").await.status(), 200);
    server.stop().await;
}
