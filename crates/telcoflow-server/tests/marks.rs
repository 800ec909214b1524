//! `agent.mark` and `call.mark` as wire frames, from an agent speaking JSON by hand: bad
//! marks get clear errors, a mark with nothing held is reached at once, and a mark reached
//! while the media connection is away is delivered when it comes back.

mod common;

use common::*;
use serde_json::{Value, json};

const RATE: u32 = 16_000;
/// Bytes of 16 kHz s16le audio per ms.
const BYTES_PER_MS: usize = 32;

/// The next `call.mark` event's data, skipping other frames.
async fn next_mark(media: &mut Media) -> Value {
    loop {
        let v = media.ws.expect_type("call_event").await;
        if v["data"]["event"] == "call.mark" {
            return v["data"].clone();
        }
    }
}

#[tokio::test]
async fn bad_marks_get_clear_errors_and_a_mark_with_nothing_held_is_reached_at_once() {
    let (server, _control, _phone, mut media) = answered_call(dev_config(), RATE).await;
    for (data, code, says) in [
        (None, "INVALID_REQUEST", "needs data"),
        (Some(json!({"id": 1})), "INVALID_REQUEST", "needs data"),
        (
            Some(json!({"name": ""})),
            "INVALID_REQUEST",
            "1 to 128 bytes",
        ),
        (
            Some(json!({"name": "x".repeat(129)})),
            "INVALID_REQUEST",
            "got 129",
        ),
    ] {
        let r = media.command("agent.mark", data.clone()).await;
        assert_eq!(r["success"], false, "{data:?}");
        assert_eq!(r["error_code"], code, "{r}");
        assert!(r["error_message"].as_str().unwrap().contains(says), "{r}");
    }
    let r = media
        .command("agent.mark", Some(json!({"name": "now", "id": 7})))
        .await;
    assert_eq!(r["success"], true, "{r}");
    assert_eq!(r["result"], json!({"name": "now", "id": 7}));
    assert_eq!(
        next_mark(&mut media).await,
        json!({"event": "call.mark", "name": "now", "id": 7, "cleared": false, "played_ms": 0})
    );
    // Behind 800 ms of audio, 64 marks wait; the 65th is refused.
    media
        .send_audio(&pcm_level(900, 800 * BYTES_PER_MS / 2))
        .await;
    for i in 0..64 {
        let r = media
            .command("agent.mark", Some(json!({"name": i.to_string()})))
            .await;
        assert_eq!(r["success"], true, "{r}");
    }
    let r = media
        .command("agent.mark", Some(json!({"name": "65th"})))
        .await;
    assert_eq!(r["error_code"], "QUOTA_EXCEEDED", "{r}");
    // The interrupt clears them all, each reported before its answer.
    let r = media.command("agent.interrupt", None).await;
    assert_eq!(r["result"]["cleared_marks"].as_array().unwrap().len(), 64);
    server.shutdown().await;
}

#[tokio::test]
async fn a_mark_reached_while_the_media_connection_is_away_is_delivered_when_it_is_back() {
    let server = start(dev_config()).await;
    let mut control = control(&server, RATE, "mixed").await;
    let mut phone = dial(&server, "+15551230001", "+15559990001", RATE).await;
    let call_in = control.take_call().await;
    let mut first = media(&call_in).await;
    assert_eq!(first.command("call.answer", None).await["success"], true);
    phone.event("answered").await;
    // 300 ms held by the server, a mark after it, then the connection is lost (no close
    // frame) before the caller has heard it.
    first
        .send_audio(&pcm_level(900, 300 * BYTES_PER_MS / 2))
        .await;
    let r = first
        .command("agent.mark", Some(json!({"name": "held", "id": 1})))
        .await;
    assert_eq!(r["success"], true, "{r}");
    drop(first);
    let url = call_in["url"].as_str().unwrap();
    let token = format!("Bearer {}", call_in["token"].as_str().unwrap());
    let reconnect = async {
        loop {
            match Ws::connect(url, &[("authorization", &token)]).await {
                Ok(ws) => break Media { ws },
                // Only until the server has seen the loss.
                Err(refused) => {
                    assert_eq!(refused.status, 409, "{}", refused.body);
                    tokio::task::yield_now().await;
                }
            }
        }
    };
    let mut again = tokio::time::timeout(WAIT, reconnect)
        .await
        .expect("the agent comes back in time");
    let mark = next_mark(&mut again).await;
    assert_eq!(mark["name"], "held");
    assert_eq!(mark["cleared"], false);
    let heard = mark["played_ms"].as_u64().unwrap();
    assert!((300..=320).contains(&heard), "{mark}");
    // What the interrupt says now is what that mark said: nothing since.
    let r = again
        .command("agent.interrupt", Some(json!({"since_mark": "held"})))
        .await;
    assert_eq!(r["result"]["played_ms"], 0, "{r}");
    assert_eq!(r["result"]["played_total_ms"], heard, "{r}");
    server.shutdown().await;
}
