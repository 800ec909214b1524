//! The media connection: token checks, commands and their errors, audio both ways, flow
//! control, interrupt, connect and the whisper / barge / spy mixes, call lifecycle.

mod common;

use common::*;
use serde_json::json;
use telcoflow_server::config::DEV_CONNECT_DESTINATION;

const RATE: u32 = 16000;
const FRAME: usize = 320; // samples in 20 ms at 16 kHz

#[tokio::test]
async fn media_upgrade_needs_a_valid_token_for_that_call() {
    let server = start(dev_config()).await;
    let mut control = control(&server, RATE, "mixed").await;
    let _phone = dial(&server, "+1", "+2", RATE).await;
    let call_in = control.take_call().await;
    let url = call_in["url"].as_str().unwrap();
    let token = call_in["token"].as_str().unwrap();

    let refused = Ws::connect(url, &[]).await.err().unwrap();
    assert_eq!(refused.status, 401);
    assert!(refused.body.contains("Bearer"), "{}", refused.body);
    let refused = Ws::connect(url, &[("authorization", "Bearer nonsense")])
        .await
        .err()
        .unwrap();
    assert_eq!(
        (refused.status, refused.body.as_str()),
        (401, "media token is malformed")
    );
    // A valid token used for another call's URL.
    let other = url.rsplit_once('/').unwrap().0.to_owned() + "/another-call";
    let refused = Ws::connect(&other, &[("authorization", &format!("Bearer {token}"))])
        .await
        .err()
        .unwrap();
    assert_eq!(
        (refused.status, refused.body.as_str()),
        (401, "media token was issued for another call")
    );
    // A forged signature.
    let forged = format!("{}x", &token[..token.len() - 1]);
    let refused = Ws::connect(url, &[("authorization", &format!("Bearer {forged}"))])
        .await
        .err()
        .unwrap();
    assert_eq!(refused.status, 401);

    let _media = media(&call_in).await;
    // One media connection per call.
    let refused = Ws::connect(url, &[("authorization", &format!("Bearer {token}"))])
        .await
        .err()
        .unwrap();
    assert_eq!(refused.status, 409);
    server.shutdown().await;
}

#[tokio::test]
async fn expired_token_is_refused() {
    let mut config = dev_config();
    config.media_token_ttl_secs = 1;
    let server = start(config).await;
    let mut control = control(&server, RATE, "mixed").await;
    let _phone = dial(&server, "+1", "+2", RATE).await;
    let call_in = control.take_call().await;
    // Token lifetimes are wall-clock; wait past it.
    tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
    let token = format!("Bearer {}", call_in["token"].as_str().unwrap());
    let refused = Ws::connect(
        call_in["url"].as_str().unwrap(),
        &[("authorization", &token)],
    )
    .await
    .err()
    .unwrap();
    assert_eq!(
        (refused.status, refused.body.as_str()),
        (401, "media token has expired")
    );
    server.shutdown().await;
}

#[tokio::test]
async fn caller_audio_reaches_the_agent_and_agent_audio_reaches_the_caller() {
    let server = start(dev_config()).await;
    let mut control = control(&server, RATE, "mixed").await;
    let mut phone = dial(&server, "+1", "+2", RATE).await;
    let call_in = control.take_call().await;
    let mut media = media(&call_in).await;
    // Flow control starts as soon as the media connection is up, so that a greeting can be
    // queued before the answer: the server asks for 20 ms frames of 16 kHz audio on channel 0.
    let request = media.ws.text().await;
    assert_eq!(request["type"], "buffer_request", "{request}");
    assert_eq!(request["data"]["prefer_audio_frame_bytes"], FRAME * 2);
    assert_eq!(request["data"]["channelId"], 0);
    let requested = request["data"]["requested_bytes"].as_u64().unwrap() as usize;
    assert!(
        requested >= FRAME * 2 && requested % (FRAME * 2) == 0,
        "{requested}"
    );
    assert_eq!(media.command("call.answer", None).await["success"], true);
    phone.event("answered").await;

    phone.send_level(1234, FRAME).await;
    let heard = media.audio(0).await;
    assert_eq!(
        heard,
        vec![1234; FRAME],
        "same rate passes through unchanged"
    );

    media.send_audio(&pcm_level(-777, FRAME)).await;
    // The caller hears silence until the agent's frame comes up, then the frame itself.
    loop {
        let frame = samples(&phone.ws.binary().await);
        assert_eq!(frame.len(), FRAME);
        if frame[0] != 0 {
            assert_eq!(frame, vec![-777; FRAME]);
            break;
        }
    }
    server.shutdown().await;
}

#[tokio::test]
async fn interrupt_drops_unplayed_agent_audio_at_once() {
    let (server, _control, mut phone, mut media) = answered_call(dev_config(), RATE).await;
    // One second of agent audio, far more than plays before the interrupt arrives.
    for _ in 0..50 {
        media.send_audio(&pcm_level(1000, FRAME)).await;
    }
    let resp = media.command("agent.interrupt", None).await;
    assert_eq!(resp["success"], true, "{resp}");
    let dropped = resp["result"]["droppedBytes"].as_u64().unwrap() as usize;
    assert!(
        dropped > 40 * FRAME * 2,
        "most of the second was dropped: {dropped}"
    );
    // Count what the caller heard of it: read until a long run of silence (at most 10 s).
    let (mut loud, mut quiet) = (0, 0);
    for _ in 0..500 {
        if samples(&phone.ws.binary().await)[0] != 0 {
            loud += 1;
            quiet = 0;
        } else {
            quiet += 1;
            if quiet == 25 {
                break;
            }
        }
    }
    assert!(loud < 10, "{loud} frames of agent audio after interrupt");
    assert_eq!(
        loud * FRAME * 2 + dropped,
        50 * FRAME * 2,
        "every byte played or dropped"
    );
    server.shutdown().await;
}

#[tokio::test]
async fn command_errors_are_clear_and_the_connection_survives() {
    let server = start(dev_config()).await;
    let mut control = control(&server, RATE, "mixed").await;
    let mut phone = dial(&server, "+1", "+2", RATE).await;
    let call_in = control.take_call().await;
    let mut media = media(&call_in).await;

    let resp = media.command("call.fly", None).await;
    assert_eq!(resp["success"], false);
    assert_eq!(resp["error_code"], "UNKNOWN_COMMAND");
    assert!(
        resp["error_message"]
            .as_str()
            .unwrap()
            .contains("call.answer")
    );

    media.ws.send_text("{not json").await;
    media
        .ws
        .send_json(json!({"type": "command", "data": {"command_id": "x1"}}))
        .await;
    let resp = media.ws.expect_type("command_response").await;
    assert_eq!(resp["data"]["command_id"], "x1");
    assert_eq!(resp["data"]["error_code"], "INVALID_REQUEST");

    let resp = media
        .command("call.connect", Some(json!({"ringTimeSeconds": 5})))
        .await;
    assert_eq!(resp["error_code"], "INVALID_STATE", "connect before answer");
    for mode in ["agent.whisper", "agent.barge", "agent.spy"] {
        let resp = media.command(mode, None).await;
        assert_eq!(resp["error_code"], "NOT_CONNECTED", "{mode}");
    }
    let resp = media.command("call.answer", None).await;
    assert_eq!(resp["success"], true);
    phone.event("answered").await;
    let again = media.command("call.answer", None).await;
    assert_eq!(again["success"], true);
    assert_eq!(again["result"]["alreadyAnswered"], true);
    for data in [
        None,
        Some(json!({"ringTimeSeconds": 0})),
        Some(json!({"ringTimeSeconds": 121})),
    ] {
        let resp = media.command("call.connect", data).await;
        assert_eq!(resp["error_code"], "INVALID_REQUEST");
    }
    // Nobody registered at the destination.
    let resp = media
        .command("call.connect", Some(json!({"ringTimeSeconds": 5})))
        .await;
    assert_eq!(resp["error_code"], "CALL_REJECTED");
    // Still alive: audio flows.
    phone.send_level(5, FRAME).await;
    assert_eq!(media.audio(0).await[0], 5);
    server.shutdown().await;
}

#[tokio::test]
async fn connect_unanswered_gives_call_unanswered_and_the_call_goes_on() {
    let (server, _control, mut phone, mut media) = answered_call(dev_config(), RATE).await;
    let mut callee = register(&server, DEV_CONNECT_DESTINATION, RATE).await;
    let resp = media
        .command("call.connect", Some(json!({"ringTimeSeconds": 1})))
        .await;
    assert_eq!(resp["success"], false);
    assert_eq!(resp["error_code"], "CALL_UNANSWERED");
    let incoming = callee.event("incoming").await;
    assert_eq!(incoming["from"], "+15551230001");
    assert_eq!(callee.event("hangup").await["reason"], "no_answer");
    phone.send_level(42, FRAME).await;
    assert_eq!(media.audio(0).await[0], 42);

    // A destination that declines is not answered either; the message says which it was.
    let connect = media.command("call.connect", Some(json!({"ringTimeSeconds": 10})));
    let decline = async {
        callee.event("incoming").await;
        callee.send_json(json!({"type": "reject"})).await;
    };
    let (resp, ()) = tokio::join!(connect, decline);
    assert_eq!(resp["error_code"], "CALL_UNANSWERED");
    assert!(
        resp["error_message"].as_str().unwrap().contains("declined"),
        "{resp}"
    );
    server.shutdown().await;
}

#[tokio::test]
async fn timeout_ms_shorter_than_the_ring_gives_timeout() {
    let (server, _control, _phone, mut media) = answered_call(dev_config(), RATE).await;
    let _callee = register(&server, DEV_CONNECT_DESTINATION, RATE).await;
    let resp = media
        .command_with_timeout("call.connect", Some(json!({"ringTimeSeconds": 30})), 300)
        .await;
    assert_eq!(resp["error_code"], "TIMEOUT");
    server.shutdown().await;
}

#[tokio::test]
async fn connect_then_barge_whisper_spy_mix_as_specified() {
    let (server, _control, mut phone, mut media) = answered_call(dev_config(), RATE).await;
    let mut callee = register(&server, DEV_CONNECT_DESTINATION, RATE).await;
    let ws_cmd = media.command("call.connect", Some(json!({"ringTimeSeconds": 10})));
    let answer_incoming = async {
        callee.event("incoming").await;
        callee.send_json(json!({"type": "answer"})).await;
        callee.event("answered").await;
    };
    let (resp, ()) = tokio::join!(ws_cmd, answer_incoming);
    assert_eq!(resp["success"], true, "{resp}");
    assert_eq!(resp["result"]["destination"], DEV_CONNECT_DESTINATION);

    // Caller says 1000, destination 2000, agent 300; each hears the others as the mode says,
    // and the agent always hears both parties.
    const SAY: (i16, i16, i16) = (1000, 2000, 300);
    for (command, expect, what) in [
        (
            None,
            (2300, 1300, Some(3000)),
            "barge is the default after connect",
        ),
        (
            Some("agent.whisper"),
            (2000, 1300, Some(3000)),
            "whisper: only the destination hears the agent",
        ),
        (
            Some("agent.spy"),
            (2000, 1000, Some(3000)),
            "spy: nobody hears the agent",
        ),
        (
            Some("agent.barge"),
            (2300, 1300, Some(3000)),
            "barge: everybody hears everybody",
        ),
    ] {
        if let Some(command) = command {
            assert_eq!(
                media.command(command, None).await["success"],
                true,
                "{command}"
            );
        }
        let heard = talk_until(
            &mut phone,
            &mut callee,
            Some(&mut media),
            SAY,
            expect,
            FRAME,
        )
        .await;
        assert_eq!(heard, Ok(()), "{what}");
    }
    server.shutdown().await;
}

/// An agent that echoes in real time has its audio played a few ms after it lands: the call's
/// media clock moves to just after the agent's frames instead of keeping the phase it started
/// with at the answer. A frame that then misses its tick is played a few ms after it lands, and
/// the frames after it do not queue a frame late behind it. Virtual time: every instant below is exact.
#[tokio::test(start_paused = true)]
async fn the_media_clock_moves_to_just_after_an_echo_agents_audio() {
    use std::time::Duration;
    use tokio::time::Instant;

    let (server, _control, mut phone, mut media) = answered_call(dev_config(), RATE).await;
    // The caller talks on its own 20 ms clock, 7 ms after the server's ticks: at the clock's
    // first phase each echoed frame would land 7 ms after a tick and wait 13 ms for the next.
    tokio::time::sleep(Duration::from_millis(7)).await;
    let mut delays = Vec::new();
    for n in 1..=50i16 {
        let sent = Instant::now();
        phone.send_level(n, FRAME).await;
        let heard = media.audio(0).await;
        assert_eq!(heard[0], n, "caller audio reaches the agent in order");
        if n == 35 {
            // Once, the agent is 6 ms slow: more than the clock's margin.
            tokio::time::sleep(Duration::from_millis(6)).await;
        }
        media.send_audio(&pcm_level(n, FRAME)).await;
        loop {
            let frame = samples(&phone.ws.binary().await);
            if frame[0] == n {
                break;
            }
            assert_eq!(frame[0], 0, "frame {n}: only silence before the echo");
        }
        delays.push(sent.elapsed());
        tokio::time::sleep_until(sent + Duration::from_millis(20)).await;
    }
    let ms = |d: &Duration| d.as_secs_f64() * 1000.0;
    assert!(
        delays[..34].iter().all(|d| ms(d) <= 5.0),
        "from the first, frames are played within the margin: {delays:?}"
    );
    // It missed its tick by 3 ms; it plays a (widened, 5 ms) margin after it lands: 11 ms.
    assert!(
        ms(&delays[34]) <= 12.0,
        "the slow frame plays soon after it lands: {delays:?}"
    );
    assert!(
        delays[35..].iter().all(|d| ms(d) <= 12.0),
        "and the frames after it are not a frame late: {delays:?}"
    );
    assert!(
        delays[45..].iter().all(|d| ms(d) <= 6.0),
        "once their waits show the clock early, it moves to the wider margin: {delays:?}"
    );
    server.shutdown().await;
}
