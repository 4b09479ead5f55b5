use std::net::IpAddr;
use std::num::NonZeroUsize;
use std::time::Duration;

use super::*;

/// Loads with no settings file and these environment variables.
fn from_env(vars: &[(&str, &str)]) -> anyhow::Result<Settings> {
    let env = vars.iter().map(|(k, v)| (k.to_string(), v.to_string()));
    Settings::load_from(Path::new("/nonexistent/settings.toml"), false, env)
}

/// Loads this settings file's text and these environment variables.
fn from_file(text: &str, vars: &[(&str, &str)]) -> anyhow::Result<Settings> {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("settings.toml");
    std::fs::write(&path, text).unwrap();
    let env = vars.iter().map(|(k, v)| (k.to_string(), v.to_string()));
    Settings::load_from(&path, true, env)
}

/// The error's text, which must hold every one of `parts`.
fn assert_error(result: anyhow::Result<Settings>, parts: &[&str]) {
    let err = format!("{:#}", result.unwrap_err());
    for part in parts {
        assert!(err.contains(part), "{part:?} not in: {err}");
    }
}

#[test]
fn defaults_match_the_protocol() {
    let s = from_env(&[]).unwrap();
    assert_eq!(s.server.listen.to_string(), "0.0.0.0:3001");
    assert_eq!(s.heartbeat.debounce, Duration::from_secs(30));
    assert_eq!(s.heartbeat.online_window, Duration::from_secs(60));
    assert_eq!(s.query.time_zone, chrono_tz::Europe::Budapest);
    assert_eq!(&*s.query.time_format, "%Y. %m. %d. %H:%M:%S");
    assert!(s.auth.require_known_user);
    assert_eq!(s.storage.backend, Backend::Embedded);
    assert!(s.cluster_config().unwrap().is_none(), "alone by default");
}

#[test]
fn the_shipped_settings_file_lists_every_key_with_its_default() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("settings.toml");
    let text = std::fs::read_to_string(&path).unwrap();
    let shipped: toml::Table = text.parse().unwrap();
    let mut defaults = toml::Table::try_from(Settings::default()).unwrap();
    // No webhooks by default: TOML writes an empty list of tables as nothing; the
    // file shows a commented-out entry instead.
    assert_eq!(
        defaults.remove("webhooks"),
        Some(toml::Value::Array(Vec::new()))
    );
    assert_eq!(shipped, defaults);
    let example: String = text
        .lines()
        .skip_while(|l| *l != "# [[webhooks]]")
        .take_while(|l| l.starts_with('#'))
        .map(|l| format!("{}\n", l.trim_start_matches("# ")))
        .collect();
    let example: Settings = toml::from_str(&example).expect("the example entry is valid");
    assert_eq!(example.webhooks.len(), 1);
    Settings::load_from(&path, true, []).unwrap();
}

/// Every key of `settings.toml`, set through the environment with a value the old
/// parser got wrong where there is one (all digits, `1.2`, lists), and what the
/// gateway then uses; `None` when that is the variable's text.
const EVERY_KEY: &[(&str, &str, Option<&str>)] = &[
    ("ELFIN__SERVER__LISTEN", "127.0.0.1:4000", None),
    ("ELFIN__SERVER__WORKERS", "3", None),
    ("ELFIN__SERVER__READ_BUFFER_BYTES", "4096", None),
    ("ELFIN__SERVER__OUTPUT_QUEUE_CHUNKS", "8", None),
    ("ELFIN__SERVER__TUNNEL_STALL_SECS", "7", None),
    ("ELFIN__SERVER__HEADER_HOLD_MS", "25", None),
    ("ELFIN__SERVER__HEADER_HOLD_MIN_MS", "2", None),
    ("ELFIN__SERVER__KEEPALIVE_SECS", "0", None),
    ("ELFIN__SERVER__BACKLOG", "128", None),
    ("ELFIN__STORAGE__BACKEND", "mongodb", None),
    ("ELFIN__STORAGE__PATH", "1234", None),
    ("ELFIN__MONGODB__URI", "mongodb://gw:12345@db:27017", None),
    ("ELFIN__MONGODB__DATABASE", "2026", None),
    ("ELFIN__MONGODB__CONNECT_TIMEOUT_MS", "1500", None),
    ("ELFIN__MONGODB__SERVER_SELECTION_TIMEOUT_MS", "2500", None),
    ("ELFIN__HEARTBEAT__DEBOUNCE_SECS", "5", None),
    ("ELFIN__HEARTBEAT__ONLINE_WINDOW_SECS", "90", None),
    ("ELFIN__PERSISTENCE__FLUSH_INTERVAL_MS", "250", None),
    ("ELFIN__PERSISTENCE__MAX_BATCH", "10", None),
    ("ELFIN__PERSISTENCE__SHUTDOWN_TIMEOUT_SECS", "3", None),
    ("ELFIN__QUERY__TIME_ZONE", "UTC", None),
    ("ELFIN__QUERY__TIME_FORMAT", "%d.%m.%Y", None),
    ("ELFIN__AUTH__REQUIRE_KNOWN_USER", "false", None),
    ("ELFIN__AUTH__VERBOSE_REASONS", "true", None),
    ("ELFIN__AUTH__CLIENTS", "client-cert", None),
    (
        "ELFIN__AUTH__TRUSTED_NETWORKS",
        "10.0.0.5/32,192.168.1.0/24",
        Some(r#"["10.0.0.5/32", "192.168.1.0/24"]"#),
    ),
    ("ELFIN__AUTH__DEVICES", "registered", None),
    ("ELFIN__AUTH__DEVICE_TAKEOVER", "when-silent", None),
    ("ELFIN__TLS__LISTEN", "127.0.0.1:4443", None),
    ("ELFIN__TLS__CERT", "1.2", None),
    ("ELFIN__TLS__KEY", "0001", None),
    ("ELFIN__TLS__CLIENT_CA", "ca.pem", None),
    ("ELFIN__TLS__CLIENT_CA_KEY", "ca.key", None),
    ("ELFIN__TLS__CLIENT_CRL", "2026.crl", None),
    ("ELFIN__TLS__MIN_VERSION", "1.2", None),
    ("ELFIN__TLS__HANDSHAKE_TIMEOUT_SECS", "4", None),
    ("ELFIN__LIMITS__MAX_CONNECTIONS", "100", None),
    ("ELFIN__LIMITS__MAX_CONNECTIONS_PER_IP", "10", None),
    ("ELFIN__LIMITS__IPV6_PREFIX", "56", None),
    ("ELFIN__LIMITS__IDENTIFY_SECS", "2", None),
    ("ELFIN__LIMITS__IDLE_SECS", "30", None),
    ("ELFIN__LIMITS__OUTPUT_QUEUE_BYTES", "65536", None),
    ("ELFIN__LIMITS__REQUESTS_PER_SEC", "5", None),
    ("ELFIN__LIMITS__REQUEST_BURST", "6", None),
    ("ELFIN__LIMITS__FAILED_LOOKUPS_PER_MIN", "0", None),
    ("ELFIN__LIMITS__FAILED_LOOKUP_DELAY_MS", "1500", None),
    ("ELFIN__LIMITS__MAX_DEVICES_PER_USER", "50", None),
    ("ELFIN__LIMITS__NEW_DEVICES_PER_MINUTE", "7", None),
    ("ELFIN__LIMITS__NEW_DEVICES_BURST", "9", None),
    ("ELFIN__LOG__LEVEL", "debug", None),
    ("ELFIN__LOG__FORMAT", "json", None),
    ("ELFIN__ADMIN__LISTEN", "0.0.0.0:9100", None),
    (
        "ELFIN__ADMIN__TOKEN",
        "3141592653589793238462643383279502884197",
        None,
    ),
    (
        "ELFIN__ADMIN__ALLOWED_HOSTS",
        r#"["gw.plant.example", "10.1.2.3"]"#,
        None,
    ),
    ("ELFIN__ADMIN__TRUSTED_PROXIES", r#"["10.0.0.9"]"#, None),
    ("ELFIN__ADMIN__SESSION_SECS", "600", None),
    ("ELFIN__AUDIT__RETENTION_DAYS", "30", None),
    ("ELFIN__AUDIT__BUDGET_PER_10MIN", "50", None),
    (
        "ELFIN__CLUSTER__NATS_URL",
        r#"["nats://n1:4222", "nats://n2:4222"]"#,
        None,
    ),
    ("ELFIN__CLUSTER__NODE_ID", "1.2", None),
    ("ELFIN__CLUSTER__SUBJECT_PREFIX", "eu.2026", None),
    ("ELFIN__CLUSTER__SUBJECT_KEY", "00123", None),
    ("ELFIN__CLUSTER__TOKEN", "12345", None),
    ("ELFIN__CLUSTER__USER", "1e3", None),
    ("ELFIN__CLUSTER__PASSWORD", "0x10", None),
    ("ELFIN__CLUSTER__NKEY_SEED", "true", None),
    ("ELFIN__CLUSTER__CREDENTIALS_FILE", "007.creds", None),
    ("ELFIN__CLUSTER__TLS_CA", "1.0", None),
    ("ELFIN__CLUSTER__TLS_CERT", "123", None),
    ("ELFIN__CLUSTER__TLS_KEY", "456", None),
    ("ELFIN__CLUSTER__REQUIRE_TLS", "true", None),
    // Any file of 32 bytes or more: the secret file wins over the secret.
    ("ELFIN__CLUSTER__SECRET_FILE", "Cargo.toml", None),
    (
        "ELFIN__CLUSTER__SECRET",
        "a secret of thirty-two bytes or more",
        None,
    ),
    ("ELFIN__CLUSTER__PEER_LISTEN", "0.0.0.0:3101", None),
    ("ELFIN__CLUSTER__PEER_ADVERTISE", "gw1.example:3101", None),
    ("ELFIN__CLUSTER__PEER_CERT", "peer.pem", None),
    ("ELFIN__CLUSTER__PEER_KEY", "peer-key.pem", None),
    ("ELFIN__CLUSTER__REQUEST_TIMEOUT_MS", "1500", None),
    ("ELFIN__CLUSTER__NODE_TIMEOUT_SECS", "5", None),
    ("ELFIN__EVENTS__OFFLINE_AFTER_SECS", "600", None),
    (
        "ELFIN__EVENTS__ALLOW_HTTP_HOSTS",
        "hooks.lan,10.0.0.7",
        Some(r#"["hooks.lan", "10.0.0.7"]"#),
    ),
];

/// A loaded value as an operator would write it back.
fn written(value: &toml::Value) -> String {
    match value {
        toml::Value::String(s) => s.clone(),
        toml::Value::Array(_) => value.to_string(),
        other => other.to_string(),
    }
}

#[test]
fn every_key_can_be_set_through_the_environment_and_keeps_its_value() {
    let named: BTreeSet<String> = EVERY_KEY
        .iter()
        .map(|(var, _, _)| {
            var[ENV_PREFIX.len()..]
                .to_ascii_lowercase()
                .replacen("__", ".", 1)
        })
        .chain(["webhooks".to_owned()])
        .collect();
    assert_eq!(named, Settings::keys(), "every key is in this test, once");

    let vars: Vec<(&str, &str)> = EVERY_KEY.iter().map(|(k, v, _)| (*k, *v)).collect();
    let s = from_env(&vars).unwrap();
    let loaded = toml::Table::try_from(&s).unwrap();
    for (var, value, uses) in EVERY_KEY {
        let key = var[ENV_PREFIX.len()..].to_ascii_lowercase();
        let (section, key) = key.split_once("__").unwrap();
        assert_eq!(
            written(&loaded[section][key]),
            uses.unwrap_or(value),
            "{var}"
        );
    }

    // What the gateway runs on, for the values the old parser turned into others.
    let token = s.admin.token.as_ref().unwrap();
    assert_eq!(token.expose(), "3141592653589793238462643383279502884197");
    let tls = s.tls.files().unwrap();
    assert!(tls.allow_tls12);
    assert_eq!(tls.handshake_timeout, Duration::from_secs(4));
    let config = s.gateway_config();
    let trusted: IpAddr = "192.168.1.77".parse().unwrap();
    let plain = elfin_actors::tls::Transport::Plain;
    assert!(config.auth.check_client(plain, trusted).is_ok());
    assert!(config
        .auth
        .check_client(plain, "192.168.2.1".parse().unwrap())
        .is_err());
    assert_eq!(config.server.header_hold, Duration::from_millis(25));
    assert_eq!(config.server.header_hold_min, Duration::from_millis(2));
    assert_eq!(config.server.keepalive, Duration::ZERO);
    assert_eq!(
        config.server.workers,
        elfin_actors::Workers::Threads(NonZeroUsize::new(3).unwrap())
    );
    assert_eq!(
        config.limits.failed_lookup_delay,
        Duration::from_millis(1500)
    );
    assert_eq!(
        config.auth.device_takeover,
        elfin_actors::registry::Takeover::WhenSilent
    );
    assert_eq!(
        config.auth.devices,
        elfin_actors::tenants::Devices::Registered
    );
    assert_eq!(config.limits.max_devices_per_user.get(), 50);
    assert_eq!(config.limits.new_devices_burst.get(), 9);
    assert_eq!(s.log.level, log::LevelFilter::Debug);
    let cluster = s.cluster_config().unwrap().unwrap();
    assert_eq!(cluster.servers, ["nats://n1:4222", "nats://n2:4222"]);
    assert_eq!(cluster.node, "1.2");
    assert_eq!(cluster.auth.token.as_deref(), Some("12345"));
    assert_eq!(cluster.auth.user, Some(("1e3".into(), "0x10".into())));
    assert_eq!(cluster.auth.nkey_seed.as_deref(), Some("true"));
    assert_eq!(cluster.node_timeout, Duration::from_secs(5));
    assert_eq!(cluster.peer_advertise.as_deref(), Some("gw1.example:3101"));
    assert_eq!(cluster.peer_listen, "0.0.0.0:3101".parse().unwrap());
    assert!(s.warnings()[0].contains("the file's secret is used"));
}

#[test]
fn a_list_key_takes_a_comma_separated_value_or_a_toml_array() {
    let nets = |value: &str| {
        from_env(&[("ELFIN__AUTH__TRUSTED_NETWORKS", value)])
            .unwrap()
            .auth
            .trusted_networks
    };
    let one: Vec<ipnet::IpNet> = vec!["127.0.0.1/32".parse().unwrap()];
    assert_eq!(nets("127.0.0.1/32"), one);
    assert_eq!(nets(r#"["127.0.0.1/32"]"#), one);
    assert_eq!(nets(" 127.0.0.1/32 , "), one);
    assert!(nets("").is_empty());
    let urls = |value: &str| {
        from_env(&[
            ("ELFIN__CLUSTER__NATS_URL", value),
            ("ELFIN__STORAGE__BACKEND", "mongodb"),
            ("ELFIN__CLUSTER__SECRET", SECRET),
            ("ELFIN__CLUSTER__PEER_LISTEN", "127.0.0.1:3101"),
        ])
        .unwrap()
        .cluster
        .nats_url
    };
    assert_eq!(
        urls("nats://a:4222,tls://b:4222"),
        ["nats://a:4222", "tls://b:4222"]
    );
    let text = "[storage]\nbackend = \"mongodb\"\n[cluster]\nnats_url = \"nats://a:4222, nats://b:4222\"\n\
                peer_listen = \"127.0.0.1:3101\"\n";
    let file = from_file(text, &[("ELFIN__CLUSTER__SECRET", SECRET)]);
    assert_eq!(
        file.unwrap().cluster.nats_url,
        ["nats://a:4222", "nats://b:4222"]
    );
}

#[test]
fn a_bad_environment_value_names_the_key_the_value_and_the_variable() {
    assert_error(
        from_env(&[("ELFIN__SERVER__WORKERS", "many")]),
        &["server.workers", "\"many\"", "ELFIN__SERVER__WORKERS"],
    );
    assert_error(
        from_env(&[("ELFIN__ADMIN__LISTEN", "nowhere")]),
        &["admin.listen", "\"nowhere\"", "ELFIN__ADMIN__LISTEN"],
    );
    assert_error(
        from_env(&[("ELFIN__AUTH__TRUSTED_NETWORKS", "10.0.0.5/33")]),
        &[
            "auth.trusted_networks",
            "10.0.0.5/33",
            "ELFIN__AUTH__TRUSTED_NETWORKS",
        ],
    );
    assert_error(
        from_env(&[("ELFIN__LIMITS__IDENTIFY_SECS", "0")]),
        &[
            "limits.identify_secs",
            "greater than 0",
            "ELFIN__LIMITS__IDENTIFY_SECS",
        ],
    );
    assert_error(
        from_env(&[("ELFIN__TLS__MIN_VERSION", "1.1")]),
        &["tls.min_version", "1.1", "ELFIN__TLS__MIN_VERSION"],
    );
    assert_error(
        from_env(&[("ELFIN__SERVER__LISTN", "127.0.0.1:1")]),
        &["ELFIN__SERVER__LISTN", "no setting server.listn"],
    );
    let err = format!(
        "{:#}",
        from_env(&[("ELFIN__SERVER__WORKERS", "x")]).unwrap_err()
    );
    assert!(!err.contains("file"), "no file is to blame: {err}");
}

#[test]
fn a_bad_file_value_names_the_file_and_line() {
    let text = "[server]\nlisten = \"0.0.0.0:3001\"\nworkers = \"many\"\n";
    assert_error(
        from_file(text, &[]),
        &["settings.toml", "line 3", "workers"],
    );
    let text = "[query]\ntime_zone = \"Mars/Olympus\"\n";
    assert_error(from_file(text, &[]), &["line 2", "\"Mars/Olympus\""]);
    let text = "[query]\ntime_format = \"%Y %Q\"\n";
    assert_error(from_file(text, &[]), &["line 2", "strftime"]);
    let text = "[persistence]\nmax_batch = 0\n";
    assert_error(from_file(text, &[]), &["line 2", "max_batch"]);
    let text = "[cluster]\nsubject_prefix = \"elfin.>\"\n";
    assert_error(from_file(text, &[]), &["line 2", "\"elfin.>\""]);
    assert_error(
        Settings::load_from(Path::new("/nonexistent/elfin.toml"), true, []),
        &["/nonexistent/elfin.toml"],
    );
}

#[test]
fn the_environment_overrides_the_file() {
    let text = "[admin]\ntoken = \"5f0c3a9e1b7d24c86e0f9a3b5c7d1e2f\"\n[server]\nworkers = 2\n";
    let s = from_file(text, &[("ELFIN__SERVER__WORKERS", "4")]).unwrap();
    assert_eq!(
        s.server.workers,
        elfin_actors::Workers::Threads(NonZeroUsize::new(4).unwrap())
    );
    assert_eq!(
        s.admin.token.unwrap().expose(),
        "5f0c3a9e1b7d24c86e0f9a3b5c7d1e2f"
    );
}

#[test]
fn rules_between_keys_name_their_key_and_its_origin() {
    assert_error(
        from_env(&[("ELFIN__CLUSTER__NATS_URL", "nats://127.0.0.1:4222")]),
        &[
            "cluster.nats_url",
            "storage.backend = \"mongodb\"",
            "ELFIN__CLUSTER__NATS_URL",
        ],
    );
    let cluster = [
        ("ELFIN__CLUSTER__NATS_URL", "nats://127.0.0.1:4222"),
        ("ELFIN__STORAGE__BACKEND", "mongodb"),
        ("ELFIN__CLUSTER__USER", "gw"),
    ];
    assert_error(from_env(&cluster), &["cluster.user", "cluster.password"]);
    assert_error(
        from_env(&[("ELFIN__TLS__CERT", "cert.pem")]),
        &["tls.cert", "tls.key"],
    );
    assert_error(
        from_env(&[("ELFIN__AUTH__CLIENTS", "tls")]),
        &["auth.clients", "tls.cert"],
    );
    assert_error(
        from_env(&[("ELFIN__ADMIN__LISTEN", "0.0.0.0:9100")]),
        &["admin.listen", "loopback", "admin.token"],
    );
    for weak in [
        "short-secret",
        // 24 characters of one letter: 0 bits, however long.
        "aaaaaaaaaaaaaaaaaaaaaaaa",
        // A 64-bit string twice.
        "0123456789abcdef0123456789abcdef",
        // 30 random digits: 100 bits.
        "845120937561029384756102938475",
    ] {
        let err = format!(
            "{:#}",
            from_env(&[("ELFIN__ADMIN__TOKEN", weak)]).unwrap_err()
        );
        assert!(
            err.contains("at least 128")
                && err.contains("openssl rand -hex 32")
                && err.contains("ELFIN__ADMIN__TOKEN"),
            "{err}"
        );
        assert!(!err.contains(weak), "a secret never shows: {err}");
    }
}

#[test]
fn tokens_are_measured_as_random_strings_of_their_alphabet() {
    use super::token_bits;
    // `openssl rand -hex 16`, `-hex 32`, `-base64 32`.
    assert_eq!(token_bits("9f86d081884c7d659a2feaa0c55ad015"), 128.0);
    assert_eq!(
        token_bits("9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"),
        256.0
    );
    assert!(token_bits("q3J7mV0pZ9xK2sL8dF4hG6tY1wR5uE0cB7nA3oI9eP8=") > 250.0);
    assert!(token_bits("correcthorsebatterystaple") < 128.0);
    assert_eq!(token_bits("abababababababababababababababab"), 2.0);
    assert_eq!(token_bits("zzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzz"), 0.0);
}

#[test]
fn cluster_mode_needs_a_long_secret_and_a_peer_port() {
    let mut cluster = vec![
        ("ELFIN__CLUSTER__NATS_URL", "nats://127.0.0.1:4222"),
        ("ELFIN__STORAGE__BACKEND", "mongodb"),
    ];
    assert_error(
        from_env(&cluster),
        &["cluster.secret", "openssl rand -hex 32"],
    );
    let short = [("ELFIN__CLUSTER__SECRET", "hunter2hunter2")];
    let err = format!(
        "{:#}",
        from_env(&[&cluster[..], &short].concat()).unwrap_err()
    );
    assert!(
        err.contains("fewer than 32") && err.contains("ELFIN__CLUSTER__SECRET"),
        "{err}"
    );
    assert!(!err.contains("hunter2"), "a secret never shows: {err}");
    let missing = [("ELFIN__CLUSTER__SECRET_FILE", "/nonexistent/secret")];
    assert_error(
        from_env(&[&cluster[..], &missing].concat()),
        &["cluster.secret_file", "/nonexistent/secret"],
    );
    // A secret of digits only stays the string it is (not a number, not rounded).
    let digits = "12345678901234567890123456789012345678";
    let numeric = [
        ("ELFIN__CLUSTER__SECRET", digits),
        ("ELFIN__CLUSTER__PEER_LISTEN", "127.0.0.1:3101"),
    ];
    let s = from_env(&[&cluster[..], &numeric].concat()).unwrap();
    assert_eq!(s.cluster.secret.as_ref().unwrap().expose(), digits);
    cluster.push(("ELFIN__CLUSTER__SECRET", SECRET));
    assert_error(from_env(&cluster), &["cluster.peer_listen", "0.0.0.0:3101"]);
    cluster.push(("ELFIN__CLUSTER__PEER_LISTEN", "0.0.0.0:3101"));
    assert_error(from_env(&cluster), &["cluster.peer_advertise", "host:port"]);
    cluster.push(("ELFIN__CLUSTER__PEER_ADVERTISE", "gw1.example:3101"));
    assert!(from_env(&cluster)
        .unwrap()
        .cluster_config()
        .unwrap()
        .is_some());
    cluster.push(("ELFIN__CLUSTER__PEER_CERT", "peer.pem"));
    assert_error(
        from_env(&cluster),
        &["cluster.peer_cert", "cluster.peer_key"],
    );
}

/// A cluster secret for tests.
const SECRET: &str = "0123456789abcdef0123456789abcdef";

#[test]
fn a_trusted_network_wider_than_a_slash_16_is_warned_about() {
    let narrow = from_env(&[("ELFIN__AUTH__TRUSTED_NETWORKS", "10.0.0.0/16,fd00::/48")]);
    assert!(narrow.unwrap().warnings().is_empty());
    let wide = from_env(&[("ELFIN__AUTH__TRUSTED_NETWORKS", "0.0.0.0/0,10.0.0.0/8,::/0")]);
    let warnings = wide.unwrap().warnings();
    assert_eq!(warnings.len(), 3, "{warnings:?}");
    assert!(
        warnings[0].contains("auth.trusted_networks: 0.0.0.0/0"),
        "{warnings:?}"
    );
}

#[test]
fn secrets_never_print() {
    let s = from_env(&[
        (
            "ELFIN__MONGODB__URI",
            "mongodb://gw:hunter2@db.example:27017/?tls=true",
        ),
        ("ELFIN__ADMIN__TOKEN", "hunter2-Xq9vT4mZ8kL2pR7wN3bY6cJ1"),
        ("ELFIN__CLUSTER__PASSWORD", "hunter2"),
    ])
    .unwrap();
    let shown = format!("{s:?}");
    assert!(!shown.contains("hunter2"), "{shown}");
    assert!(
        shown.contains("mongodb://gw:****@db.example:27017/?tls=true"),
        "{shown}"
    );
}

#[test]
fn the_cluster_waits_for_a_silent_node_at_most_the_stall_time() {
    let s = from_env(&[
        ("ELFIN__CLUSTER__NATS_URL", "nats://n1:4222"),
        ("ELFIN__STORAGE__BACKEND", "mongodb"),
        ("ELFIN__SERVER__TUNNEL_STALL_SECS", "5"),
        ("ELFIN__CLUSTER__SECRET", SECRET),
        ("ELFIN__CLUSTER__PEER_LISTEN", "127.0.0.1:3101"),
    ])
    .unwrap();
    let c = s.cluster_config().unwrap().unwrap();
    assert_eq!(c.node_timeout, Duration::from_secs(5));
    assert!(!c.node.as_str().is_empty(), "the host name");
}

#[test]
fn set_up_errors_name_the_setting_as_the_operator_writes_it() {
    let err = from_env(&[("ELFIN__AUTH__CLIENTS", "user-cert")])
        .unwrap_err()
        .to_string();
    assert!(
        err.contains(r#"auth.clients = "user-cert" needs TLS: set tls.cert and tls.key"#),
        "{err}"
    );
    assert!(!err.contains("UserCert"), "{err}");
    let err = from_env(&[
        ("ELFIN__AUTH__CLIENTS", "client-cert"),
        ("ELFIN__TLS__CERT", "server.pem"),
        ("ELFIN__TLS__KEY", "server.key"),
    ])
    .unwrap_err()
    .to_string();
    assert!(
        err.contains(r#"auth.clients = "client-cert" needs tls.client_ca"#),
        "{err}"
    );
}

#[test]
fn webhooks_are_read_from_the_file_and_from_one_environment_variable() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("settings.toml");
    std::fs::write(
        &path,
        r#"
[[webhooks]]
url = "https://hooks.example.com/elfin"
secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
events = ["device.offline", "device.back_online"]

[[webhooks]]
url = "http://127.0.0.1:8080/relay"
secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
users = ["alice"]
"#,
    )
    .unwrap();
    let s = Settings::load_from(&path, true, []).unwrap();
    assert_eq!(s.webhooks.len(), 2);
    assert_eq!(s.webhooks[1].users, ["alice"]);
    let endpoints = s.endpoints().unwrap();
    assert_eq!(endpoints[0].name, "hooks.example.com");

    let env = [(
        "ELFIN__WEBHOOKS".to_owned(),
        r#"[{url = "http://localhost:9000/x", secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw", timeout_secs = 3}]"#
            .to_owned(),
    )];
    let s = Settings::load_from(&path, true, env).unwrap();
    assert_eq!(s.webhooks.len(), 1, "the environment replaces the list");
    assert_eq!(s.webhooks[0].timeout, Duration::from_secs(3));

    let bad = [(
        "ELFIN__WEBHOOKS".to_owned(),
        r#"[{url = "http://localhost:9000/x", secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw", timeout_secs = 0}]"#
            .to_owned(),
    )];
    let err = Settings::load_from(&path, true, bad)
        .unwrap_err()
        .to_string();
    assert!(err.contains("webhooks") && err.contains("[0]"), "{err}");
    assert!(!err.contains("whsec_"), "the secret is not shown: {err}");
}
