use std::time::Duration;

use crate::TestServer;

#[tokio::test]
async fn records_are_acknowledged_with_their_offsets_and_read_back() {
    let server = TestServer::start().await;
    assert_eq!(server.create("orders", 2).await.status(), 201);
    let body = "{\"id\":1,\"c\":\"x\"}\n{\"id\":2,\"c\":\"y\"}\n{\"id\":3,\"c\":\"x\"}\n";
    let response = reqwest::Client::new()
        .post(format!("{}/v1/topics/orders/records?key=c", server.base))
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let placed: serde_json::Value = response.json().await.unwrap();
    assert_eq!(placed["records"], 3);
    let offsets = placed["offsets"].as_array().unwrap();
    assert_eq!(
        offsets[0]["partition"], offsets[2]["partition"],
        "same key, same partition"
    );
    assert!(offsets[2]["offset"].as_u64().unwrap() > offsets[0]["offset"].as_u64().unwrap());

    let p = offsets[0]["partition"].as_u64().unwrap();
    let in_p = offsets.iter().filter(|o| o["partition"] == p).count();
    let response = reqwest::get(format!(
        "{}/v1/topics/orders/partitions/{p}/records?offset=0",
        server.base
    ))
    .await
    .unwrap();
    assert_eq!(
        response.headers()["kappa-next-offset"],
        in_p.to_string().as_str()
    );
    let text = response.text().await.unwrap();
    let values: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["value"].clone())
        .filter(|v| v["c"] == "x")
        .collect();
    assert_eq!(
        values,
        vec![
            serde_json::json!({"id":1,"c":"x"}),
            serde_json::json!({"id":3,"c":"x"})
        ]
    );

    let info = server.get_json("/v1/topics/orders").await;
    assert_eq!(info["partitions"][p as usize]["visible_offset"], in_p);
    let health = server.get_json("/v1/health").await;
    assert_eq!(health["status"], "ok");
    server.stop().await;
}

#[tokio::test]
async fn a_long_poll_wakes_when_records_arrive() {
    let server = TestServer::start().await;
    server.create("t", 1).await;
    let url = format!(
        "{}/v1/topics/t/partitions/0/records?offset=0&wait_ms=10000",
        server.base
    );
    let poll = tokio::spawn(async move {
        let started = std::time::Instant::now();
        let text = reqwest::get(url).await.unwrap().text().await.unwrap();
        (text, started.elapsed())
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(server.post("t", "{\"late\":true}\n").await.status(), 200);
    let (text, waited) = poll.await.unwrap();
    assert!(text.contains("\"late\":true"), "{text}");
    assert!(waited < Duration::from_secs(5), "woke after {waited:?}");
    // With nothing new, a poll returns empty after its wait, pointing at the same offset.
    let response = reqwest::get(format!(
        "{}/v1/topics/t/partitions/0/records?offset=1&wait_ms=50",
        server.base
    ))
    .await
    .unwrap();
    assert_eq!(response.headers()["kappa-next-offset"], "1");
    assert_eq!(response.text().await.unwrap(), "");
    server.stop().await;
}

#[tokio::test]
async fn shutdown_ends_long_polls() {
    let server = TestServer::start().await;
    server.create("t", 1).await;
    let url = format!(
        "{}/v1/topics/t/partitions/0/records?wait_ms=30000",
        server.base
    );
    let poll = tokio::spawn(async move { reqwest::get(url).await.map(|r| r.status()) });
    tokio::time::sleep(Duration::from_millis(100)).await;
    let started = std::time::Instant::now();
    server.stop().await;
    assert!(started.elapsed() < Duration::from_secs(10));
    let _ = poll.await.unwrap();
}

#[tokio::test]
async fn reads_by_timestamp_and_offsets() {
    let server = TestServer::start().await;
    server.create("t", 1).await;
    server.post("t", "{\"a\":1}\n").await;
    let before = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis()
        + 1;
    tokio::time::sleep(Duration::from_millis(5)).await;
    server.post("t", "{\"a\":2}\n").await;
    let offsets = server
        .get_json(&format!(
            "/v1/topics/t/partitions/0/offsets?timestamp_ms={before}"
        ))
        .await;
    assert_eq!(offsets["offset_for_timestamp"], 1);
    assert_eq!(offsets["visible_offset"], 2);
    let text = reqwest::get(format!(
        "{}/v1/topics/t/partitions/0/records?timestamp_ms={before}",
        server.base
    ))
    .await
    .unwrap()
    .text()
    .await
    .unwrap();
    assert_eq!(text.lines().count(), 1);
    server.stop().await;
}
