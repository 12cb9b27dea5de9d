//! `[log]` of `kappa.toml`: where the log is (embedded, or a Kafka-protocol cluster), the
//! librdkafka properties passed through, and what is refused in them (secrets written out,
//! producer settings that exactly once rests on).

use std::collections::BTreeMap;

use serde::Deserialize;

/// Where the log is: kappa's own, embedded in `kappa up` (the default), or a Kafka-protocol
/// cluster (Apache Kafka, Redpanda, MSK, Tansu…).
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct LogSection {
    #[serde(default)]
    pub backend: LogBackend,
    /// For `backend = "kafka"`: librdkafka's properties, passed through (`bootstrap.servers`,
    /// `security.protocol`, `sasl.*`, `ssl.*`…). `"<property>_env" = "VAR"` sets `<property>`
    /// from the environment variable `VAR`: the only way a secret is given (the project folder
    /// is in git).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub kafka: BTreeMap<String, PropertyValue>,
}

/// Which log [`LogSection`] names.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LogBackend {
    #[default]
    Embedded,
    Kafka,
}

/// A librdkafka property's value as TOML writes it (librdkafka takes each as text).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(untagged)]
pub enum PropertyValue {
    Text(String),
    Number(i64),
    Flag(bool),
}

impl std::fmt::Display for PropertyValue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PropertyValue::Text(text) => f.write_str(text),
            PropertyValue::Number(n) => write!(f, "{n}"),
            PropertyValue::Flag(b) => write!(f, "{b}"),
        }
    }
}

/// librdkafka's properties that hold secrets: given only through `"<property>_env"`.
pub const KAFKA_SECRET_PROPERTIES: &[&str] = &[
    "sasl.password",
    "sasl.oauthbearer.config",
    "sasl.oauthbearer.client.secret",
    "sasl.oauthbearer.client.credentials.client.secret",
    "sasl.oauthbearer.assertion.private.key.passphrase",
    "sasl.oauthbearer.assertion.private.key.pem",
    "ssl.key.password",
    "ssl.key.pem",
    "ssl.keystore.password",
];

/// What kappa sets on its producer, whatever `[log.kafka]` says: retries never duplicate or
/// reorder (idempotence), a record is acknowledged once every in-sync replica has it, and a
/// key lands where Kafka's Java client (and kappa's embedded log) puts it.
pub const KAFKA_PRODUCER_SETTINGS: &[(&str, &str)] = &[
    ("enable.idempotence", "true"),
    ("acks", "all"),
    ("partitioner", "murmur2_random"),
];

/// The producer setting kappa fixes ([`KAFKA_PRODUCER_SETTINGS`]) that librdkafka's property
/// `name` is, with the value kappa gives it: librdkafka reads `topic.<name>` as `<name>`, and
/// `request.required.acks` as `acks`.
pub fn kafka_fixed_setting(name: &str) -> Option<(&'static str, &'static str)> {
    let bare = name.strip_prefix("topic.").unwrap_or(name);
    let bare = match bare {
        "request.required.acks" => "acks",
        other => other,
    };
    KAFKA_PRODUCER_SETTINGS
        .iter()
        .find(|(p, _)| *p == bare)
        .copied()
}

/// Why `[log.kafka]`'s `name` = `value` cannot be kept: it contradicts a producer setting
/// kappa's guarantees rest on ([`kafka_fixed_setting`]; `acks = -1` is `all`).
pub fn kafka_setting_problem(name: &str, value: &str) -> Option<String> {
    let (bare, wanted) = kafka_fixed_setting(name)?;
    let same = value == wanted || (bare == "acks" && value == "-1");
    (!same).then(|| {
        format!(
            "log.kafka.\"{name}\" = \"{value}\": kappa needs {bare} = {wanted} (it acknowledges a \
             record only once the cluster keeps it, exactly once, where its key belongs)"
        )
    })
}

/// What is wrong with `[log]`, one message per problem.
pub(crate) fn log_problems(log: &LogSection) -> Vec<String> {
    let mut problems = Vec::new();
    match log.backend {
        LogBackend::Embedded if !log.kafka.is_empty() => problems.push(
            "log.kafka is set, but log.backend is \"embedded\": set backend = \"kafka\" to use \
             the cluster"
                .to_owned(),
        ),
        LogBackend::Kafka
            if !(log.kafka.contains_key("bootstrap.servers")
                || log.kafka.contains_key("bootstrap.servers_env")) =>
        {
            problems.push(
                "log.backend = \"kafka\" needs log.kafka.\"bootstrap.servers\": the cluster's \
             brokers, e.g. \"127.0.0.1:9092\""
                    .to_owned(),
            );
        }
        _ => {}
    }
    for (name, value) in &log.kafka {
        if KAFKA_SECRET_PROPERTIES.contains(&name.as_str()) {
            problems.push(format!(
                "log.kafka.\"{name}\": a secret is never stored in the project folder; name the \
                 environment variable that holds it: \"{name}_env\" = \"KAFKA_PASSWORD\""
            ));
        }
        if let Some(problem) = kafka_setting_problem(name, &value.to_string()) {
            problems.push(problem);
        }
        if let Some(property) = name.strip_suffix("_env") {
            if kafka_fixed_setting(property).is_some() {
                problems.push(format!(
                    "log.kafka.\"{name}\": kappa sets {property} itself; it is not read from \
                     the environment"
                ));
            }
            match value {
                PropertyValue::Text(var) if is_env_name(var) => {}
                _ => problems.push(format!(
                    "log.kafka.\"{name}\": the name of the environment variable that holds \
                     {property}, e.g. \"KAFKA_PASSWORD\" (found `{value}`)"
                )),
            }
            if log.kafka.contains_key(property) {
                problems.push(format!(
                    "log.kafka: both \"{property}\" and \"{name}\" are set; keep one"
                ));
            }
        }
    }
    problems
}

/// Whether `s` can name an environment variable.
fn is_env_name(s: &str) -> bool {
    let mut chars = s.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}
