//! `slack`: Slack incoming webhook, `{"text": …}` with one line per alert.
//! Anything that accepts Slack's incoming-webhook JSON works too
//! (Mattermost, Rocket.Chat, Discord's `/slack` endpoint).

use serde::Deserialize;

use super::http_post::{Poster, check_url};
use super::{BuildContext, DeliverFuture, Sink, SinkSettings};
use crate::alert::{Alert, Status};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SlackSettings {
    /// The incoming-webhook URL. It *is* the secret: write `${SLACK_URL}`.
    pub url: String,
}

impl SinkSettings for SlackSettings {
    fn validate(&self) -> Result<(), String> {
        check_url("url", &self.url).map(drop)
    }

    fn build(self, cx: &BuildContext) -> Result<Box<dyn Sink>, String> {
        let poster = Poster::new(check_url("url", &self.url)?, Default::default(), cx.timeout)?;
        Ok(Box::new(SlackSink { poster }))
    }
}

pub struct SlackSink {
    poster: Poster,
}

/// Slack's mrkdwn treats `&`, `<` and `>` as markup; and one alert is one
/// line of the message, so a newline in a label (or ESC, or a bidirectional
/// override) is shown escaped, as in the logs ([`crate::escape`]), instead
/// of forging another alert's line.
fn escape(s: &str) -> String {
    crate::escape::escape(s)
        .replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// `:red_circle: *FIRING* [critical] *HighInputErrors* ALERT! … (hostname=r1, interface=et-0/0/1)`
pub fn line(a: &Alert) -> String {
    let (icon, status) = match a.status {
        Status::Firing => (":red_circle:", "FIRING"),
        Status::Resolved => (":large_green_circle:", "RESOLVED"),
    };
    let labels = a.labels_text();
    format!(
        "{icon} *{status}* [{}] *{}* {} ({})",
        a.severity.as_str(),
        escape(&a.name),
        escape(a.summary()),
        escape(&labels)
    )
}

/// The whole batch as one message.
pub fn text(alerts: &[Alert]) -> String {
    alerts.iter().map(line).collect::<Vec<_>>().join("\n")
}

impl Sink for SlackSink {
    fn deliver<'a>(&'a self, alerts: &'a [Alert]) -> DeliverFuture<'a> {
        Box::pin(async move {
            self.poster
                .post_json(&serde_json::json!({ "text": text(alerts) }))
                .await
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn markup_in_alert_text_is_escaped() {
        let a = Alert {
            fingerprint: "f".into(),
            rule: "r".into(),
            name: "A<B>".into(),
            severity: crate::alert::Severity::Major,
            status: Status::Resolved,
            labels: [("h".to_string(), "x&y".to_string())].into(),
            annotations: Default::default(),
            starts_at: String::new(),
            ends_at: None,
            origin: Default::default(),
        };
        assert_eq!(
            line(&a),
            ":large_green_circle: *RESOLVED* [major] *A&lt;B&gt;* A&lt;B&gt; (h=x&amp;y)"
        );
    }

    #[test]
    fn a_hostile_label_cannot_forge_another_line_of_the_message() {
        let a = Alert {
            fingerprint: "f".into(),
            rule: "r".into(),
            name: "N".into(),
            severity: crate::alert::Severity::Major,
            status: Status::Firing,
            labels: [(
                "host".to_string(),
                "r1\n:red_circle: *FIRING* [critical] *Fake*\u{1b}[2J\u{202e}".to_string(),
            )]
            .into(),
            annotations: Default::default(),
            starts_at: String::new(),
            ends_at: None,
            origin: Default::default(),
        };
        let text = text(&[a]);
        assert_eq!(text.lines().count(), 1, "{text}");
        assert!(
            text.contains(r"r1\n:red_circle:") && text.contains(r"\x1b[2J\u{202e}"),
            "{text}"
        );
    }
}
