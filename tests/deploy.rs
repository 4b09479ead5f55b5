//! The deployment files in `deploy/`: the systemd unit passes `systemd-analyze
//! verify` and carries the hardening the README promises; the compose files set only
//! settings that exist.

mod common;

use std::process::Command;

use common::repo_file;

#[test]
fn the_systemd_unit_verifies_and_is_hardened() {
    let unit = std::fs::read_to_string(repo_file("deploy/elfin-gateway.service")).unwrap();
    for directive in [
        "User=elfin",
        "StateDirectory=elfin-gateway",
        "Environment=ELFIN__STORAGE__PATH=/var/lib/elfin-gateway/elfin.db",
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
        "Restart=on-failure",
        "LimitNOFILE=262144",
        "ExecReload=/bin/kill -HUP $MAINPID",
    ] {
        assert!(unit.lines().any(|l| l == directive), "{directive} missing");
    }
    let Ok(analyze) = which("systemd-analyze") else {
        eprintln!("SKIPPED systemd-analyze verify: systemd-analyze is not installed");
        return;
    };
    // Verify the unit as shipped, pointed at the binary this build made.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("elfin-gateway.service");
    let unit = unit.replace(
        "/usr/local/bin/elfin-gateway",
        env!("CARGO_BIN_EXE_elfin-gateway"),
    );
    std::fs::write(&path, unit).unwrap();
    let out = Command::new(analyze)
        .arg("verify")
        .arg(&path)
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success() && said.trim().is_empty(), "{said}");
}

#[test]
fn the_container_runs_as_a_non_root_user_next_to_mongodb() {
    let docker = std::fs::read_to_string(repo_file("deploy/Dockerfile")).unwrap();
    let runtime = docker.rsplit("\nFROM ").next().unwrap();
    assert!(runtime.contains("USER nonroot"), "{runtime}");
    assert!(docker.matches("\nFROM ").count() >= 1, "multi-stage build");
    let compose = std::fs::read_to_string(repo_file("deploy/compose.yaml")).unwrap();
    assert!(compose.contains("ELFIN__STORAGE__BACKEND: mongodb"));
    assert!(compose.contains("image: mongo:"));
}

#[test]
fn the_cluster_compose_file_runs_three_nodes_on_nats_and_mongodb() {
    let compose = std::fs::read_to_string(repo_file("deploy/compose.cluster.yaml")).unwrap();
    assert!(compose.contains("image: nats:"));
    assert!(compose.contains("image: mongo:"));
    assert!(compose.contains("ELFIN__STORAGE__BACKEND: mongodb"));
    assert!(compose.contains("ELFIN__CLUSTER__NATS_URL: nats://nats:4222"));
    // NATS asks for a token, the nodes seal their messages and dial each other.
    assert!(compose.contains(r#"command: ["--auth", "${ELFIN_NATS_TOKEN"#));
    assert!(compose.contains("ELFIN__CLUSTER__TOKEN: ${ELFIN_NATS_TOKEN"));
    assert!(compose.contains("ELFIN__CLUSTER__SECRET: ${ELFIN_CLUSTER_SECRET"));
    assert!(compose.contains("ELFIN__CLUSTER__PEER_LISTEN: 0.0.0.0:3101"));
    for node in ["a", "b", "c"] {
        assert!(
            compose.contains(&format!("  gateway-{node}:\n")),
            "gateway-{node}"
        );
        assert!(compose.contains(&format!("ELFIN__CLUSTER__NODE_ID: {node}\n")));
        assert!(compose.contains(&format!(
            "ELFIN__CLUSTER__PEER_ADVERTISE: gateway-{node}:3101\n"
        )));
    }
}

#[test]
fn the_compose_files_set_only_settings_that_exist() {
    let shipped: toml::Table = std::fs::read_to_string(repo_file("settings.toml"))
        .unwrap()
        .parse()
        .unwrap();
    for file in ["deploy/compose.yaml", "deploy/compose.cluster.yaml"] {
        let compose = std::fs::read_to_string(repo_file(file)).unwrap();
        let keys: Vec<&str> = compose
            .split_whitespace()
            .filter_map(|word| word.strip_prefix("ELFIN__")?.strip_suffix(':'))
            .collect();
        assert!(!keys.is_empty(), "{file}");
        for key in keys {
            let (section, name) = key.split_once("__").unwrap();
            let known = shipped
                .get(&section.to_lowercase())
                .and_then(|s| s.get(name.to_lowercase()))
                .is_some();
            assert!(known, "{file}: ELFIN__{key} is no setting");
        }
    }
}

fn which(program: &str) -> Result<std::path::PathBuf, ()> {
    std::env::var_os("PATH")
        .iter()
        .flat_map(std::env::split_paths)
        .map(|dir| dir.join(program))
        .find(|p| p.is_file())
        .ok_or(())
}
