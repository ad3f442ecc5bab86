//! The status page at `/`: server-rendered HTML from the binary, no
//! external assets. Everything that comes from messages, rules or Redis
//! (labels, annotations, errors, silence comments) goes through [`esc`]; the
//! little script only reloads, filters rows and calls the silences API.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::Arc;

use axum::extract::State;
use axum::http::header;
use axum::response::{IntoResponse, Response};

use super::alerts::{AlertView, Filter};
use super::{StatusApi, StatusView};
use crate::alert::silence::Silence;
use crate::clock::rfc3339;

/// HTML-escapes text, and shows control characters (newline, CR, ESC) as
/// `\n`, `\r`, `\x1b`, so one label stays one line.
pub fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in crate::escape::escape(s).chars() {
        match c {
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '&' => out.push_str("&amp;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

pub async fn page(State(api): State<Arc<StatusApi>>) -> Response {
    let alerts = api.alerts(&Filter::of(Vec::new())).await;
    let rules = api.rules();
    let status = api.status().await;
    let html = render(alerts.as_ref().ok(), &rules, &status);
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (
                header::CONTENT_SECURITY_POLICY,
                "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; connect-src 'self'; img-src data:",
            ),
        ],
        html,
    )
        .into_response()
}

const STYLE: &str = "body{font:14px/1.4 system-ui,sans-serif;margin:0 1.5em 2em;color:#222}
h1{font-size:1.3em;margin:.6em 0}h2{font-size:1.1em;margin:1.4em 0 .4em;border-bottom:1px solid #ccc}
table{border-collapse:collapse;width:100%}td,th{text-align:left;padding:3px 8px;border-bottom:1px solid #eee;vertical-align:top}
th{background:#f4f4f4}.firing{color:#b00;font-weight:600}.pending{color:#b60}.silenced{opacity:.55}
.tag{display:inline-block;background:#eef;border-radius:3px;padding:0 4px;margin:1px 2px;font-family:monospace;font-size:12px}
.err{color:#b00;font-family:monospace;white-space:pre-wrap}.ok{color:#070}.bar{display:flex;gap:1em;align-items:center;flex-wrap:wrap}
.muted{color:#777}input{font:inherit}";

/// Toolbar behaviour: the label filter hides rows whose text lacks the
/// filter; refresh reloads every 10 s unless a field is being typed in;
/// silence buttons call `/api/silences` with the token field.
const SCRIPT: &str = r#"
function $(id){return document.getElementById(id)}
function applyFilter(){var f=$('filter').value.toLowerCase();
 document.querySelectorAll('tr[data-labels]').forEach(function(r){
  r.style.display=r.getAttribute('data-labels').toLowerCase().indexOf(f)>=0?'':'none'})}
function auth(){var t=$('token').value;return t?{'Authorization':'Bearer '+t}:{}}
function addSilence(){var h=auth();h['Content-Type']='application/json';
 fetch('/api/silences',{method:'POST',headers:h,body:JSON.stringify({matchers:$('matchers').value.split(/\s+/).filter(Boolean),
  duration:$('duration').value,comment:$('comment').value,created_by:'status page'})})
 .then(function(r){return r.text().then(function(t){$('result').textContent=r.status+' '+t;if(r.ok)location.reload()})})}
function expire(id){fetch('/api/silences/'+encodeURIComponent(id),{method:'DELETE',headers:auth()})
 .then(function(r){return r.text().then(function(t){$('result').textContent=r.status+' '+t;if(r.ok)location.reload()})})}
setInterval(function(){var a=document.activeElement;if(!a||a.tagName!=='INPUT')location.reload()},10000);
"#;

fn labels_html(labels: &BTreeMap<String, String>) -> String {
    labels
        .iter()
        .map(|(k, v)| format!("<span class=\"tag\">{}={}</span>", esc(k), esc(v)))
        .collect()
}

fn labels_text(a: &AlertView) -> String {
    let mut t = format!(
        "alertname={} severity={} rule={}",
        a.name, a.severity, a.rule
    );
    for (k, v) in &a.labels {
        let _ = write!(t, " {k}={v}");
    }
    t
}

pub fn render(
    alerts: Option<&(Vec<AlertView>, Vec<Silence>)>,
    rules: &[super::rules::RuleView],
    status: &StatusView,
) -> String {
    let mut h = String::new();
    let _ = write!(
        h,
        "<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\"><meta name=\"viewport\" content=\"width=device-width\">\
<title>tripline</title><style>{STYLE}</style></head><body>\
<h1>tripline {} <span class=\"muted\">instance {} · up {}s · Redis {} ({})</span></h1>\
<div class=\"bar\"><label>Filter labels <input id=\"filter\" oninput=\"applyFilter()\" placeholder=\"host=core-1\"></label>\
<label>Admin token <input id=\"token\" type=\"password\"></label><span id=\"result\" class=\"muted\"></span></div>",
        esc(status.version),
        esc(status.instance.as_deref().unwrap_or("(starting)")),
        status.uptime_seconds,
        esc(&status.redis.endpoint),
        if status.redis.reachable {
            "reachable"
        } else {
            "unreachable"
        },
    );
    alerts_section(&mut h, alerts);
    rules_section(&mut h, rules);
    reloads_section(&mut h, status);
    sinks_section(&mut h, status);
    silences_section(&mut h, alerts.map(|(_, s)| s.as_slice()));
    let _ = write!(h, "<script>{SCRIPT}</script></body></html>");
    h
}

fn alerts_section(h: &mut String, alerts: Option<&(Vec<AlertView>, Vec<Silence>)>) {
    let Some((alerts, _)) = alerts else {
        h.push_str("<h2>Alerts</h2><p class=\"err\">Redis is unreachable: the alert state cannot be read.</p>");
        return;
    };
    let firing = alerts.iter().filter(|a| a.state == "firing").count();
    let _ = write!(
        h,
        "<h2 id=\"alerts\">Alerts: <span id=\"firing-count\">{firing}</span> firing, {} pending</h2>",
        alerts.len() - firing
    );
    if alerts.is_empty() {
        h.push_str("<p class=\"muted\">Nothing is pending or firing.</p>");
        return;
    }
    let mut groups: BTreeMap<&str, Vec<&AlertView>> = BTreeMap::new();
    for a in alerts {
        groups.entry(&a.name).or_default().push(a);
    }
    h.push_str("<table><tr><th>State</th><th>Labels</th><th>Severity</th><th>Summary</th><th>Since</th><th>Rule</th></tr>");
    for (name, group) in groups {
        let _ = write!(
            h,
            "<tr><th colspan=\"6\">{} ({})</th></tr>",
            esc(name),
            group.len()
        );
        for a in group {
            let silenced = !a.silenced_by.is_empty();
            let _ = write!(
                h,
                "<tr class=\"alert{}\" data-labels=\"{}\"><td class=\"{}\">{}{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
                if silenced { " silenced" } else { "" },
                esc(&labels_text(a)),
                a.state,
                a.state,
                if silenced {
                    format!(
                        " <span class=\"tag\" title=\"{}\">silenced</span>",
                        esc(&a.silenced_by.join(", "))
                    )
                } else {
                    String::new()
                },
                labels_html(&a.labels),
                a.severity,
                esc(a.annotations.get("summary").map_or("", String::as_str)),
                esc(&a.active_since),
                esc(&a.rule),
            );
        }
    }
    h.push_str("</table>");
}

fn rules_section(h: &mut String, rules: &[super::rules::RuleView]) {
    let _ = write!(h, "<h2 id=\"rules\">Rules ({})</h2>", rules.len());
    h.push_str("<table><tr><th>Rule</th><th>Subscriptions</th><th>Evaluations</th><th>Errors</th><th>p50 / p99</th><th>Last error</th></tr>");
    for r in rules {
        let evals: Vec<String> = r
            .evaluations
            .iter()
            .filter(|(_, n)| **n > 0)
            .map(|(d, n)| format!("{d} {n}"))
            .collect();
        let subs: Vec<String> = r
            .subscriptions
            .iter()
            .map(|s| format!("{} ({})", s.name, s.streams.join(", ")))
            .collect();
        let secs = |v: Option<f64>| v.map_or("–".into(), |s| format!("{:.0} µs", s * 1e6));
        let _ = write!(
            h,
            "<tr data-labels=\"rule={}\"><td>{}{}</td><td>{}</td><td>{}</td><td>{}</td><td>{} / {}</td><td class=\"err\">{}</td></tr>",
            esc(&r.name),
            esc(&r.file),
            if r.shadow {
                " <span class=\"tag\">shadow</span>"
            } else {
                ""
            },
            esc(&subs.join("; ")),
            esc(&evals.join(", ")),
            r.errors,
            secs(r.evaluation_seconds.p50),
            secs(r.evaluation_seconds.p99),
            r.last_error
                .as_ref()
                .map_or(String::new(), |e| esc(&format!(
                    "{} (message {}, {})",
                    e.error, e.message_id, e.at
                ))),
        );
    }
    h.push_str("</table>");
}

fn reloads_section(h: &mut String, status: &StatusView) {
    h.push_str("<h2 id=\"reloads\">Last reload</h2><table><tr><th>Kind</th><th>When</th><th>Trigger</th><th>Result</th></tr>");
    for (kind, r) in &status.reloads {
        let _ = write!(
            h,
            "<tr><td>{}</td><td>{}</td><td>{}</td><td class=\"{}\">{}: {}</td></tr>",
            esc(kind),
            esc(&r.at),
            esc(&r.trigger),
            if r.result == "success" { "ok" } else { "err" },
            r.result,
            esc(&r.detail),
        );
    }
    h.push_str("</table>");
}

fn sinks_section(h: &mut String, status: &StatusView) {
    h.push_str("<h2 id=\"sinks\">Sinks</h2><table><tr><th>Sink</th><th>Kind</th><th>State</th><th>Last success</th><th>Backlog</th><th>Dead letters</th><th>Last error</th></tr>");
    for (name, s) in &status.sinks {
        let _ = write!(
            h,
            "<tr><td>{}</td><td>{}</td><td class=\"{}\">{}</td><td>{}</td><td>{}</td><td>{}</td><td class=\"err\">{}</td></tr>",
            esc(name),
            esc(&s.kind),
            if s.state == "healthy" { "ok" } else { "err" },
            s.state,
            esc(s.last_success.as_deref().unwrap_or("–")),
            s.backlog,
            s.dead_letters,
            s.last_error
                .as_ref()
                .map_or(String::new(), |e| esc(&format!("{} ({})", e.error, e.at))),
        );
    }
    h.push_str("</table>");
}

fn silences_section(h: &mut String, silences: Option<&[Silence]>) {
    let silences = silences.unwrap_or_default();
    let _ = write!(
        h,
        "<h2 id=\"silences\">Silences: <span id=\"silence-count\">{}</span></h2>",
        silences.len()
    );
    h.push_str(
        "<table><tr><th>Matchers</th><th>Until</th><th>By</th><th>Comment</th><th></th></tr>",
    );
    for s in silences {
        let matchers: Vec<String> = s
            .matchers
            .iter()
            .map(|m| format!("{}{}{}", m.label, if m.regex { "=~" } else { "=" }, m.value))
            .collect();
        let _ = write!(
            h,
            "<tr class=\"silence\"><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td><button data-id=\"{}\" onclick=\"expire(this.getAttribute('data-id'))\">Expire</button></td></tr>",
            matchers
                .iter()
                .map(|m| format!("<span class=\"tag\">{}</span>", esc(m)))
                .collect::<String>(),
            esc(&rfc3339(s.ends_ms)),
            esc(&s.created_by),
            esc(&s.comment),
            esc(&s.id),
        );
    }
    h.push_str("</table><p class=\"bar\"><input id=\"matchers\" size=\"40\" placeholder=\"host=core-1 alertname=~High.*\">\
<input id=\"duration\" size=\"5\" value=\"2h\"><input id=\"comment\" placeholder=\"comment\"><button onclick=\"addSilence()\">Add silence</button></p>");
}

#[cfg(test)]
mod tests {
    use super::esc;

    #[test]
    fn hostile_label_values_cannot_open_tags_or_break_lines() {
        let e = esc("<script>alert('x')</script>\"\n\u{1b}[31m");
        assert!(!e.contains('<') && !e.contains('"') && !e.contains('\n') && !e.contains('\u{1b}'));
        assert!(e.contains("&lt;script&gt;"), "{e}");
    }
}
