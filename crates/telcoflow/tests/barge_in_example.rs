//! The barge-in example against the real server: a simulated caller listens to the first
//! sentence and part of the second, then talks; the agent's transcript holds the first
//! sentence and exactly the words of the second the phone heard begin.

mod common;

#[allow(dead_code, unreachable_pub)]
#[path = "../examples/barge_in.rs"]
mod barge_in;

use common::*;
use telcoflow::TelcoflowClient;
use telcoflow_proto::sim::NetworkFrame;

/// 20 ms at 16 kHz.
const FRAME: usize = 640;

/// Runs of frames with sound in them: the words heard.
fn words(pcm: &[u8]) -> usize {
    let loud: Vec<bool> = pcm.chunks_exact(FRAME).map(|f| energy(f) > 0).collect();
    loud.windows(2).filter(|w| w[1] && !w[0]).count() + usize::from(loud.first() == Some(&true))
}

#[tokio::test]
async fn the_transcript_holds_what_the_caller_heard() {
    let server = start_server().await;
    let client = TelcoflowClient::connect(config(server.base_url()))
        .await
        .unwrap();
    let mut events = client.events();
    let mut phone = Phone::dial(server.base_url(), "+4912345", "+4900001").await;
    let call = next_call(&mut events).await;
    // The test keeps a handle: the call outlives the agent's return, for the phone to hear on.
    let agent = {
        let call = call.clone();
        tokio::spawn(async move { barge_in::converse(&call).await })
    };
    phone
        .wait_for(|f| matches!(f, NetworkFrame::Answered { .. }))
        .await;
    // The first sentence (8 words of 240 ms) and some 600 ms of the second, then the caller
    // talks; the phone keeps listening meanwhile.
    phone.hear(FRAME * 50 * 5 / 2).await;
    let talk = pattern(16_000 / 5, 3)
        .chunks_exact(2)
        .map(|b| i16::from_le_bytes([b[0], b[1]]))
        .collect();
    let playback = phone.control().play(talk).unwrap();
    let heard_until = phone.heard.len() + FRAME * 50;
    phone.hear(heard_until).await;
    assert!(
        tokio::time::timeout(WAIT, playback.finished())
            .await
            .unwrap()
    );
    let transcript = tokio::time::timeout(WAIT, agent)
        .await
        .expect("the agent stops in time")
        .unwrap()
        .unwrap();
    assert_eq!(transcript[0], barge_in::ANSWER[0]);
    assert_eq!(transcript.len(), 2, "{transcript:?}");
    let partial = transcript[1].strip_suffix("...").expect("a cut sentence");
    assert!(barge_in::ANSWER[1].starts_with(partial), "{partial}");
    let said = partial.split_whitespace().count();
    let first = barge_in::ANSWER[0].split_whitespace().count();
    let heard = words(&phone.heard) - first;
    assert!(
        said.abs_diff(heard) <= 1 && said > 0,
        "the transcript keeps {said} words of the second sentence, the phone heard {heard} begin"
    );
    phone.hangup();
    drop(call);
    client.shutdown().await;
    server.shutdown().await;
}
