//! Settings from `TELCOFLOW_<SECTION>_<KEY>` environment variables, over the TOML file: the
//! top-level keys are section `SERVER` (`TELCOFLOW_SERVER_LISTEN`), the others their table
//! (`TELCOFLOW_SIP_RTP_PORTS`, `TELCOFLOW_METRICS_TOKEN`). Arrays of tables (connectors, SIP
//! trunks, accounts and registrations) stay in the file. Each value is checked as it is read, so that a bad
//! one is named by its variable.

use super::{Config, ConfigError};
use std::net::{IpAddr, SocketAddr};
use toml::{Table, Value};

/// How a variable's text becomes a TOML value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EnvKind {
    /// Taken as it is.
    Text,
    /// A whole number (0 or more).
    Number,
    /// `true`/`false` (also `1`/`0`, `yes`/`no`, `on`/`off`).
    Bool,
    /// `HOST:PORT` with an IP address.
    Address,
    /// An IP address.
    Ip,
    /// Comma-separated items.
    List,
}

/// One setting that an environment variable can give.
#[derive(Debug, Clone, Copy)]
pub struct EnvSetting {
    /// The TOML table (`None`: the top level, section `SERVER`).
    pub section: Option<&'static str>,
    /// The key in that table.
    pub key: &'static str,
    /// How its value is read.
    pub kind: EnvKind,
}

impl EnvSetting {
    /// `TELCOFLOW_<SECTION>_<KEY>`.
    pub fn variable(&self) -> String {
        format!(
            "TELCOFLOW_{}_{}",
            self.section.unwrap_or("server").to_ascii_uppercase(),
            self.key.to_ascii_uppercase()
        )
    }

    /// `section.key` as the file writes it (`key` at the top level).
    pub fn toml_key(&self) -> String {
        match self.section {
            Some(s) => format!("{s}.{}", self.key),
            None => self.key.to_owned(),
        }
    }
}

const fn s(section: Option<&'static str>, key: &'static str, kind: EnvKind) -> EnvSetting {
    EnvSetting { section, key, kind }
}

use EnvKind::{Address, Bool, Ip, List, Number, Text};

/// `sip.enabled` is not a key of the file (a `[sip]` section turns SIP on): from the
/// environment, `true` turns SIP on with the file's `[sip]` or the defaults, `false` off.
const SIP_ENABLED: &str = "enabled";

/// Every setting of the file that an environment variable can give (docs/config.md lists
/// them).
pub const ENV_SETTINGS: &[EnvSetting] = &[
    s(None, "listen", Address),
    s(None, "public_url", Text),
    s(None, "ring_timeout_secs", Number),
    s(None, "media_token_ttl_secs", Number),
    s(None, "token_secret", Text),
    s(None, "control_ping_interval_secs", Number),
    s(None, "control_idle_timeout_secs", Number),
    s(None, "drain_grace_secs", Number),
    s(None, "drain_handover_secs", Number),
    s(None, "admin_token", Text),
    s(Some("tls"), "cert", Text),
    s(Some("tls"), "key", Text),
    s(Some("tls"), "client_ca", Text),
    s(Some("limits"), "max_control_frame_bytes", Number),
    s(Some("limits"), "max_media_frame_bytes", Number),
    s(
        Some("limits"),
        "max_control_connections_per_connector",
        Number,
    ),
    s(Some("limits"), "max_calls_per_connector", Number),
    s(Some("limits"), "max_pending_commands_per_call", Number),
    s(Some("limits"), "control_send_queue", Number),
    s(Some("limits"), "media_send_queue", Number),
    s(Some("limits"), "max_playout_ms", Number),
    s(Some("limits"), "catch_up_after_stall", Bool),
    s(Some("limits"), "max_closed_sessions_per_connector", Number),
    s(Some("limits"), "max_console_views_per_connector", Number),
    s(Some("limits"), "max_connections", Number),
    s(Some("limits"), "max_connections_per_ip", Number),
    s(Some("limits"), "header_read_timeout_secs", Number),
    s(Some("limits"), "write_timeout_secs", Number),
    s(Some("sip"), SIP_ENABLED, Bool),
    s(Some("sip"), "listen", Address),
    s(Some("sip"), "rtp_ports", Text),
    s(Some("sip"), "public_ip", Ip),
    s(Some("sip"), "rtp_timeout_secs", Number),
    s(Some("sip"), "allow", List),
    s(Some("sip"), "realm", Text),
    s(Some("sip"), "invite_rate_limit", Number),
    s(Some("sip"), "invite_rate_interval_secs", Number),
    s(Some("sip"), "tcp_message_timeout_secs", Number),
    s(Some("sip"), "tcp_idle_timeout_secs", Number),
    s(Some("sip"), "tcp_max_connections", Number),
    s(Some("sip"), "tcp_max_connections_per_ip", Number),
    s(Some("sip"), "timer_t1_ms", Number),
    s(Some("sip"), "codecs", List),
    s(Some("sip"), "tls_listen", Address),
    s(Some("sip"), "tls_cert", Text),
    s(Some("sip"), "tls_key", Text),
    s(Some("sip"), "tls_ca", Text),
    s(Some("sip"), "tls_verify", Bool),
    s(Some("sip"), "srtp", Text),
    s(Some("sim"), "enabled", Bool),
    s(Some("cluster"), "nats_url", Text),
    s(Some("cluster"), "node_id", Text),
    s(Some("cluster"), "token", Text),
    s(Some("cluster"), "user", Text),
    s(Some("cluster"), "password", Text),
    s(Some("cluster"), "credentials_file", Text),
    s(Some("cluster"), "tls_ca", Text),
    s(Some("cluster"), "tls_cert", Text),
    s(Some("cluster"), "tls_key", Text),
    s(Some("metrics"), "enabled", Bool),
    s(Some("metrics"), "token", Text),
    s(Some("recording"), "dir", Text),
    s(Some("recording"), "retention_days", Number),
    s(Some("recording"), "max_concurrent", Number),
];

/// The prefixes of the variables this module reads; a variable with one of them that names
/// no setting is refused (a typo must not go unnoticed). Other `TELCOFLOW_*` variables (the
/// SDK's, `TELCOFLOW_API_KEY`) are not settings of the file and are left alone.
const SECTIONS: [&str; 8] = [
    "SERVER",
    "TLS",
    "LIMITS",
    "SIP",
    "SIM",
    "CLUSTER",
    "METRICS",
    "RECORDING",
];

fn invalid(var: &str, message: impl Into<String>) -> ConfigError {
    ConfigError::Env {
        variable: var.to_owned(),
        message: message.into(),
    }
}

/// The TOML value of `text` for `setting` (read from `var`). An empty value is refused
/// rather than taken as unset or as "": `TELCOFLOW_SERVER_ADMIN_TOKEN=` must not quietly
/// remove the file's token.
fn parse(setting: &EnvSetting, var: &str, text: &str) -> Result<Value, ConfigError> {
    let t = text.trim();
    if t.is_empty() {
        return Err(invalid(
            var,
            "is empty (unset it to keep the file's value or the default)",
        ));
    }
    Ok(match setting.kind {
        Text => Value::String(text.to_owned()),
        Number => match t.parse::<u64>().ok().and_then(|n| i64::try_from(n).ok()) {
            Some(n) => Value::Integer(n),
            None => {
                return Err(invalid(
                    var,
                    format!("must be a whole number, got {text:?}"),
                ));
            }
        },
        Bool => match t.to_ascii_lowercase().as_str() {
            "true" | "1" | "yes" | "on" => Value::Boolean(true),
            "false" | "0" | "no" | "off" => Value::Boolean(false),
            _ => return Err(invalid(var, format!("must be true or false, got {text:?}"))),
        },
        Address => match t.parse::<SocketAddr>() {
            Ok(a) => Value::String(a.to_string()),
            Err(_) => {
                return Err(invalid(
                    var,
                    format!("must be IP:PORT (e.g. 0.0.0.0:8080), got {text:?}"),
                ));
            }
        },
        Ip => match t.parse::<IpAddr>() {
            Ok(ip) => Value::String(ip.to_string()),
            Err(_) => return Err(invalid(var, format!("must be an IP address, got {text:?}"))),
        },
        List => Value::Array(
            t.split(',')
                .map(str::trim)
                .filter(|i| !i.is_empty())
                .map(|i| Value::String(i.to_owned()))
                .collect(),
        ),
    })
}

/// Whether `name` has the prefix of a setting's variable (`TELCOFLOW_<SECTION>_`).
fn is_setting_variable(name: &str) -> bool {
    name.strip_prefix("TELCOFLOW_").is_some_and(|rest| {
        SECTIONS
            .iter()
            .any(|s| rest.strip_prefix(s).is_some_and(|r| r.starts_with('_')))
    })
}

/// The `TELCOFLOW_*` variables of `vars` (an environment, as [`std::env::vars_os`] lists
/// it) as text. Other variables are skipped unread, so that one that is not UTF-8 (which
/// [`std::env::vars`] would panic on) does not matter; a setting's variable that is not
/// UTF-8 is an error naming it.
pub fn telcoflow_vars(
    vars: impl IntoIterator<Item = (std::ffi::OsString, std::ffi::OsString)>,
) -> Result<Vec<(String, String)>, ConfigError> {
    let mut out = Vec::new();
    for (name, value) in vars {
        if !name.as_encoded_bytes().starts_with(b"TELCOFLOW_") {
            continue;
        }
        let lossy = name.to_string_lossy();
        match (name.to_str(), value.into_string()) {
            (Some(name), Ok(value)) => out.push((name.to_owned(), value)),
            _ if is_setting_variable(&lossy) => {
                return Err(invalid(&lossy, "is not valid UTF-8"));
            }
            // Another program's (the SDK's) variable: not ours to refuse.
            _ => {}
        }
    }
    Ok(out)
}

/// The `TELCOFLOW_*` variables of this process (see [`telcoflow_vars`]).
pub fn process_vars() -> Result<Vec<(String, String)>, ConfigError> {
    telcoflow_vars(std::env::vars_os())
}

/// Applies the variables of `vars` that name settings to `table` (the file's, parsed).
/// Returns the variables applied, with the settings they gave.
pub(super) fn apply(
    table: &mut Table,
    vars: impl IntoIterator<Item = (String, String)>,
) -> Result<Vec<(String, &'static EnvSetting)>, ConfigError> {
    let mut vars: Vec<(String, String)> = vars
        .into_iter()
        .filter(|(name, _)| is_setting_variable(name))
        .collect();
    // Applied in a fixed order, whatever order the environment lists them in.
    vars.sort();
    let mut applied = Vec::new();
    let mut sip_enabled = None;
    for (name, text) in vars {
        let Some(setting) = ENV_SETTINGS.iter().find(|s| s.variable() == name) else {
            return Err(invalid(
                &name,
                "names no setting (docs/config.md lists the TELCOFLOW_* variables; connectors, \
                 SIP trunks, accounts and registrations are set in the file only)",
            ));
        };
        let value = parse(setting, &name, &text)?;
        match setting.section {
            None => {
                table.insert(setting.key.to_owned(), value);
            }
            Some("sip") if setting.key == SIP_ENABLED => sip_enabled = value.as_bool(),
            Some(section) => {
                let entry = table
                    .entry(section)
                    .or_insert_with(|| Value::Table(Table::new()));
                let Some(t) = entry.as_table_mut() else {
                    return Err(invalid(
                        &name,
                        format!("[{section}] in the file is not a table"),
                    ));
                };
                t.insert(setting.key.to_owned(), value);
            }
        }
        applied.push((name, setting));
    }
    // Last, so that `TELCOFLOW_SIP_ENABLED=false` wins over the other SIP variables.
    match sip_enabled {
        Some(true) => {
            table
                .entry("sip")
                .or_insert_with(|| Value::Table(Table::new()));
        }
        Some(false) => {
            table.remove("sip");
        }
        None => {}
    }
    Ok(applied)
}

impl Config {
    /// Reads a TOML file, applies the `TELCOFLOW_<SECTION>_<KEY>` variables of this process
    /// over it, and validates the result: what `telcoflow serve --config` runs with.
    pub fn from_file_with_env(path: &std::path::Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Self::from_toml_with_env(&text, process_vars()?)
    }

    /// Parses TOML text, applies the settings of `vars` (name, value) over it, and
    /// validates the result.
    pub fn from_toml_with_env(
        text: &str,
        vars: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Self, ConfigError> {
        let mut table: Table = toml::from_str(text)?;
        let applied = apply(&mut table, vars)?;
        let config = if applied.is_empty() {
            // From the text, not the table: its errors say the line and column.
            toml::from_str::<Self>(text)?
        } else {
            Self::from_table(table, &applied)?
        };
        config.validate().map_err(|e| name_variables(e, &applied))?;
        Ok(config)
    }

    /// This configuration with the settings of `vars` applied over it (not validated): for
    /// the embedded development defaults, which no file gives.
    pub fn with_env(
        self,
        vars: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Self, ConfigError> {
        let development = self.sim.development;
        let mut table = match Value::try_from(&self) {
            Ok(Value::Table(table)) => table,
            Ok(_) => Table::new(),
            Err(e) => {
                return Err(ConfigError::Invalid(format!(
                    "cannot apply the environment: {e}"
                )));
            }
        };
        let applied = apply(&mut table, vars)?;
        if applied.is_empty() {
            return Ok(self);
        }
        let mut config = Self::from_table(table, &applied)?;
        // Never read from a file or the environment (see `SimConfig::development`).
        config.sim.development = development;
        Ok(config)
    }

    fn from_table(
        table: Table,
        applied: &[(String, &'static EnvSetting)],
    ) -> Result<Self, ConfigError> {
        Self::deserialize(Value::Table(table)).map_err(|e| {
            let names: Vec<&str> = applied.iter().map(|(n, _)| n.as_str()).collect();
            if names.is_empty() {
                ConfigError::Toml(e)
            } else {
                ConfigError::Invalid(format!(
                    "{e} (with {} from the environment)",
                    names.join(", ")
                ))
            }
        })
    }
}

/// Adds the variable to a validation error about a setting it gave.
fn name_variables(e: ConfigError, applied: &[(String, &'static EnvSetting)]) -> ConfigError {
    match e {
        ConfigError::Invalid(message) => {
            let from: Vec<&str> = applied
                .iter()
                .filter(|(_, s)| message.contains(&s.toml_key()))
                .map(|(n, _)| n.as_str())
                .collect();
            if from.is_empty() {
                ConfigError::Invalid(message)
            } else {
                ConfigError::Invalid(format!("{message} (set by {})", from.join(", ")))
            }
        }
        other => other,
    }
}

use serde::Deserialize as _;

#[cfg(test)]
mod tests {
    use super::*;
    use telcoflow_sip::rtp::codec::Codec;

    const FILE: &str = "listen = '127.0.0.1:9000'\n\
        [limits]\nmax_calls_per_connector = 5\n\
        [[connectors]]\nuuid = '7b0e9c2a-1d1e-4a5b-9f55-2f1f3b7a9e01'\napi_key = 'k'\n";

    fn vars(list: &[(&str, &str)]) -> Vec<(String, String)> {
        list.iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    fn with(list: &[(&str, &str)]) -> Result<Config, ConfigError> {
        Config::from_toml_with_env(FILE, vars(list))
    }

    #[test]
    fn variables_override_the_file() {
        let plain = with(&[]).unwrap();
        assert_eq!(plain.listen.port(), 9000);
        assert!(plain.sip.is_none());
        let c = with(&[
            ("TELCOFLOW_SERVER_LISTEN", "0.0.0.0:7000"),
            ("TELCOFLOW_LIMITS_MAX_CALLS_PER_CONNECTOR", "9"),
            ("TELCOFLOW_LIMITS_CATCH_UP_AFTER_STALL", "false"),
            ("TELCOFLOW_METRICS_TOKEN", "m"),
            ("TELCOFLOW_SIP_LISTEN", "127.0.0.1:5070"),
            ("TELCOFLOW_SIP_ALLOW", "10.0.0.0/8, 192.0.2.7"),
            ("TELCOFLOW_SIP_CODECS", "G722,PCMU"),
            ("TELCOFLOW_SIP_SRTP", "required"),
            ("TELCOFLOW_SIM_ENABLED", "yes"),
            // Not settings of the file: left alone.
            ("TELCOFLOW_API_KEY", "sdk"),
            ("TELCOFLOW_BASE_URL", "ws://x"),
            ("PATH", "/bin"),
        ])
        .unwrap();
        assert_eq!(c.listen, "0.0.0.0:7000".parse().unwrap());
        assert_eq!(c.limits.max_calls_per_connector, 9);
        assert!(!c.limits.catch_up_after_stall);
        assert_eq!(c.metrics.token.as_deref(), Some("m"));
        assert!(c.metrics.enabled);
        assert!(c.sim.enabled && !c.sim.development);
        let sip = c.sip.expect("a SIP variable turns SIP on");
        assert_eq!(sip.listen.port(), 5070);
        assert_eq!(
            sip.allow.as_deref(),
            Some(&["10.0.0.0/8".to_owned(), "192.0.2.7".to_owned()][..])
        );
        assert_eq!(
            sip.codec_list().unwrap(),
            [Codec::G722, Codec::Pcmu],
            "in the variable's order"
        );
        assert_eq!(sip.srtp, "required");
        assert_eq!(sip.rtp_ports, "20000-20999", "the rest keeps its default");
    }

    #[test]
    fn sip_enabled_turns_sip_on_and_off() {
        let on = with(&[("TELCOFLOW_SIP_ENABLED", "true")]).unwrap();
        assert_eq!(on.sip.unwrap().listen.port(), 5060);
        let file_with_sip = format!("{FILE}[sip]\nlisten = '127.0.0.1:5080'\n");
        let off = Config::from_toml_with_env(
            &file_with_sip,
            vars(&[
                ("TELCOFLOW_SIP_ENABLED", "false"),
                ("TELCOFLOW_SIP_RTP_PORTS", "30000-30010"),
            ]),
        )
        .unwrap();
        assert!(
            off.sip.is_none(),
            "false wins over the file and other SIP variables"
        );
    }

    #[test]
    fn a_bad_value_names_its_variable() {
        for (var, value, says) in [
            ("TELCOFLOW_SERVER_LISTEN", "nowhere", "IP:PORT"),
            ("TELCOFLOW_SERVER_RING_TIMEOUT_SECS", "soon", "whole number"),
            ("TELCOFLOW_LIMITS_MAX_CONNECTIONS", "-1", "whole number"),
            ("TELCOFLOW_METRICS_ENABLED", "maybe", "true or false"),
            ("TELCOFLOW_SIP_PUBLIC_IP", "host.example", "IP address"),
            ("TELCOFLOW_SIP_LISTNE", "127.0.0.1:5060", "names no setting"),
            ("TELCOFLOW_SERVER_CONNECTORS", "x", "names no setting"),
            ("TELCOFLOW_SERVER_ADMIN_TOKEN", "", "is empty"),
            ("TELCOFLOW_SERVER_TOKEN_SECRET", " ", "is empty"),
            ("TELCOFLOW_METRICS_TOKEN", "", "is empty"),
            ("TELCOFLOW_SIP_ALLOW", "", "is empty"),
        ] {
            let err = with(&[(var, value)]).unwrap_err().to_string();
            assert!(err.contains(var) && err.contains(says), "{var}: {err}");
        }
        // A value that parses but that validation refuses: named too.
        let err = with(&[("TELCOFLOW_SIP_RTP_PORTS", "9-8")])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("sip.rtp_ports") && err.contains("TELCOFLOW_SIP_RTP_PORTS"),
            "{err}"
        );
        let err = with(&[("TELCOFLOW_SERVER_RING_TIMEOUT_SECS", "0")])
            .unwrap_err()
            .to_string();
        assert!(err.contains("TELCOFLOW_SERVER_RING_TIMEOUT_SECS"), "{err}");
    }

    #[cfg(unix)]
    #[test]
    fn variables_that_are_not_utf8_are_skipped_or_named() {
        use std::ffi::OsString;
        use std::os::unix::ffi::OsStringExt as _;
        let bad = || OsString::from_vec(vec![b'a', 0xff]);
        let os = |k: &str, v: &str| (OsString::from(k), OsString::from(v));
        let got = telcoflow_vars([
            (OsString::from("BAD"), bad()),
            (OsString::from_vec(b"X\xff".to_vec()), OsString::from("v")),
            os("PATH", "/bin"),
            os("TELCOFLOW_SERVER_LISTEN", "0.0.0.0:7000"),
            // The SDK's: not a setting, skipped even when it is not UTF-8.
            (OsString::from("TELCOFLOW_API_KEY"), bad()),
        ])
        .unwrap();
        assert_eq!(got, vars(&[("TELCOFLOW_SERVER_LISTEN", "0.0.0.0:7000")]));
        let err = telcoflow_vars([(OsString::from("TELCOFLOW_METRICS_TOKEN"), bad())]).unwrap_err();
        assert!(
            matches!(&err, ConfigError::Env { variable, .. } if variable == "TELCOFLOW_METRICS_TOKEN"),
            "{err}"
        );
        assert!(err.to_string().contains("UTF-8"), "{err}");
    }

    #[test]
    fn without_variables_an_error_in_the_file_names_its_line() {
        let text = format!("{FILE}bogus = 1\n");
        let err = Config::from_toml_with_env(&text, vars(&[("PATH", "/bin")]))
            .unwrap_err()
            .to_string();
        assert!(err.contains("bogus") && err.contains("line 7"), "{err}");
    }

    #[test]
    fn the_development_defaults_take_variables_too() {
        let dev = Config::development()
            .with_env(vars(&[("TELCOFLOW_SERVER_DRAIN_GRACE_SECS", "3")]))
            .unwrap();
        assert_eq!(dev.drain_grace_secs, 3);
        assert!(dev.sim.development, "kept: never read from the environment");
        assert_eq!(dev.connectors.len(), 1);
    }

    /// Every key of the file (but arrays of tables) has its variable, and docs/config.md
    /// lists each one.
    #[test]
    fn every_setting_has_a_documented_variable() {
        let mut full = Config::from_toml(
            "public_url = 'ws://x'\ntoken_secret = 's'\nadmin_token = 'a'\n\
             [tls]\ncert = 'c'\nkey = 'k'\nclient_ca = 'ca'\n\
             [sip]\npublic_ip = '192.0.2.1'\nallow = ['0.0.0.0/0']\n\
             [cluster]\nnats_url = 'nats://n:4222'\nnode_id = 'a'\ntoken = 't'\n\
             [metrics]\ntoken = 'm'\n\
             [recording]\ndir = 'r'\n\
             [[connectors]]\nuuid = '7b0e9c2a-1d1e-4a5b-9f55-2f1f3b7a9e01'\napi_key = 'k'\n",
        )
        .unwrap();
        let cluster = full.cluster.as_mut().unwrap();
        cluster.user = Some("u".into());
        cluster.password = Some("p".into());
        cluster.credentials_file = Some("c".into());
        cluster.tls_ca = Some("ca".into());
        cluster.tls_cert = Some("c".into());
        cluster.tls_key = Some("k".into());
        let Value::Table(table) = Value::try_from(&full).unwrap() else {
            panic!("a table")
        };
        let known = |section: Option<&str>, key: &str| {
            ENV_SETTINGS
                .iter()
                .any(|s| s.section == section && s.key == key)
        };
        let mut keys = 0;
        for (key, value) in &table {
            match value {
                Value::Table(t) => {
                    for (inner, v) in t {
                        let tables = matches!(v, Value::Array(a) if a.iter().all(Value::is_table) && !a.is_empty());
                        let file_only = tables
                            || matches!(inner.as_str(), "trunks" | "accounts" | "registrations");
                        assert!(
                            file_only || known(Some(key), inner),
                            "{key}.{inner} has no variable"
                        );
                        keys += 1;
                    }
                }
                Value::Array(_) if key == "connectors" => {}
                _ => {
                    assert!(known(None, key), "{key} has no variable");
                    keys += 1;
                }
            }
        }
        assert!(keys > 40, "{keys}");
        let doc = include_str!("../../../../docs/config.md");
        for s in ENV_SETTINGS {
            assert!(
                doc.contains(&s.variable()),
                "docs/config.md lacks {}",
                s.variable()
            );
        }
    }
}
