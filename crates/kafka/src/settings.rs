//! librdkafka's configuration from `[log.kafka]`: every property passed through as text, a
//! `"<property>_env" = "VAR"` read from the environment (the only way secrets are given), and
//! the settings kappa's guarantees rest on, which the project cannot turn off.

use std::collections::BTreeMap;

pub use kappa_pipeline::KAFKA_PRODUCER_SETTINGS as PRODUCER_SETTINGS;
use kappa_pipeline::{PropertyValue, kafka_fixed_setting, kafka_setting_problem};
use rdkafka::ClientConfig;

use crate::{KafkaError, Result};

/// The client configuration `[log.kafka]` (`properties`) gives, with `env` looking up
/// environment variables. An error names the property and what to do.
pub fn client_config(
    properties: &BTreeMap<String, PropertyValue>,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<ClientConfig> {
    let mut config = ClientConfig::new();
    for (name, value) in properties {
        if let Some(property) = name.strip_suffix("_env") {
            if kafka_fixed_setting(property).is_some() {
                return Err(KafkaError::Settings(format!(
                    "\"{name}\": kappa sets {property} itself"
                )));
            }
            let var = value.to_string();
            let secret = env(&var).ok_or_else(|| {
                KafkaError::Settings(format!(
                    "\"{name}\" names the environment variable {var}, which is not set: export \
                     {var} with the value of {property}"
                ))
            })?;
            config.set(property, secret);
            continue;
        }
        if let Some(problem) = kafka_setting_problem(name, &value.to_string()) {
            return Err(KafkaError::Settings(problem));
        }
        config.set(name, value.to_string());
    }
    if config.get("bootstrap.servers").is_none() {
        return Err(KafkaError::Settings(
            "no \"bootstrap.servers\": name the cluster's brokers, e.g. \"127.0.0.1:9092\"".into(),
        ));
    }
    Ok(config)
}

/// The brokers `config` names (what errors say the cluster is).
pub fn servers(config: &ClientConfig) -> String {
    config.get("bootstrap.servers").unwrap_or("?").to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn properties(pairs: &[(&str, &str)]) -> BTreeMap<String, PropertyValue> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), PropertyValue::Text((*v).to_owned())))
            .collect()
    }

    #[test]
    fn secrets_come_from_the_environment() {
        let env = |var: &str| (var == "KAFKA_PASSWORD").then(|| "s3cret".to_owned());
        let config = client_config(
            &properties(&[
                ("bootstrap.servers", "127.0.0.1:9092"),
                ("sasl.password_env", "KAFKA_PASSWORD"),
            ]),
            &env,
        )
        .expect("a configuration");
        assert_eq!(config.get("sasl.password"), Some("s3cret"));
        assert_eq!(config.get("sasl.password_env"), None);

        let missing = client_config(
            &properties(&[
                ("bootstrap.servers", "127.0.0.1:9092"),
                ("sasl.password_env", "NOT_SET_HERE"),
            ]),
            &env,
        )
        .expect_err("the variable is missing")
        .to_string();
        assert!(
            missing.contains("NOT_SET_HERE, which is not set"),
            "{missing}"
        );
        assert!(missing.contains("sasl.password"), "{missing}");
    }

    #[test]
    fn what_exactly_once_rests_on_cannot_be_turned_off() {
        let refused = client_config(
            &properties(&[("bootstrap.servers", "b:9092"), ("acks", "1")]),
            &|_| None,
        )
        .expect_err("acks=1 loses acknowledged records")
        .to_string();
        assert!(refused.contains("kappa needs acks = all"), "{refused}");
        for same in [("acks", "all"), ("acks", "-1"), ("topic.acks", "all")] {
            assert!(
                client_config(
                    &properties(&[("bootstrap.servers", "b:9092"), same]),
                    &|_| None
                )
                .is_ok(),
                "{same:?}"
            );
        }
        // librdkafka reads topic.<name> as <name>.
        let refused = client_config(
            &properties(&[
                ("bootstrap.servers", "b:9092"),
                ("topic.partitioner", "random"),
            ]),
            &|_| None,
        )
        .expect_err("another partitioner puts keys elsewhere")
        .to_string();
        assert!(
            refused.contains("kappa needs partitioner = murmur2_random"),
            "{refused}"
        );
        let none = client_config(&properties(&[]), &|_| None)
            .expect_err("no brokers")
            .to_string();
        assert!(none.contains("bootstrap.servers"), "{none}");
    }
}
