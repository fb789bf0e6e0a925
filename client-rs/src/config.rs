//! Where to connect and whom to trust. Resolution order: explicit values,
//! then `ARROWBUS_BROKER` / `ARROWBUS_CA`, then the profile written by
//! `busd dev` (`$ARROWBUS_CONFIG_DIR/profile.toml`, default
//! `~/.config/arrowbus/profile.toml`).

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::error::{Error, Result};

#[derive(Debug, Clone)]
pub struct ClientConfig {
    /// `host:port` of one or more brokers; the first that answers is used.
    pub brokers: Vec<String>,
    /// PEM file with the CA certificate(s) that signed the brokers' certificates.
    pub ca: Option<PathBuf>,
    /// TLS server name to verify; defaults to the host part of the address.
    pub server_name: Option<String>,
    /// Timeout of unary requests.
    pub request_timeout: Duration,
}

/// The profile file `busd dev` writes.
#[derive(Debug, Clone, Deserialize)]
pub struct Profile {
    pub brokers: Vec<String>,
    pub ca: Option<PathBuf>,
    pub server_name: Option<String>,
}

impl Profile {
    pub fn default_path() -> PathBuf {
        if let Some(d) = std::env::var_os("ARROWBUS_CONFIG_DIR") {
            return PathBuf::from(d).join("profile.toml");
        }
        let home = std::env::var_os("HOME")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from("."));
        home.join(".config/arrowbus/profile.toml")
    }

    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| Error::Config(format!("cannot read profile {}: {e}", path.display())))?;
        toml::from_str(&text)
            .map_err(|e| Error::Config(format!("profile {} is invalid: {e}", path.display())))
    }
}

impl ClientConfig {
    pub fn new(broker: impl Into<String>) -> Self {
        Self {
            brokers: vec![broker.into()],
            ca: None,
            server_name: None,
            request_timeout: Duration::from_millis(arrowbus_wire::limits::REQUEST_TIMEOUT_MS),
        }
    }

    pub fn with_ca(mut self, ca: impl Into<PathBuf>) -> Self {
        self.ca = Some(ca.into());
        self
    }

    pub fn with_server_name(mut self, name: impl Into<String>) -> Self {
        self.server_name = Some(name.into());
        self
    }

    /// Resolve from explicit values, the environment and the profile, in
    /// that order of precedence.
    pub fn resolve(broker: Option<String>, ca: Option<PathBuf>) -> Result<Self> {
        let broker = broker.or_else(|| {
            std::env::var("ARROWBUS_BROKER")
                .ok()
                .filter(|s| !s.is_empty())
        });
        let ca = ca.or_else(|| std::env::var_os("ARROWBUS_CA").map(PathBuf::from));
        let path = Profile::default_path();
        let profile = if path.exists() {
            Some(Profile::load(&path)?)
        } else {
            None
        };
        let brokers = match (broker, &profile) {
            (Some(b), _) => b.split(',').map(|s| s.trim().to_owned()).collect(),
            (None, Some(p)) if !p.brokers.is_empty() => p.brokers.clone(),
            _ => {
                return Err(Error::Config(format!(
                    "no broker given: pass --broker HOST:PORT, set ARROWBUS_BROKER, or run `busd dev` (it writes {})",
                    path.display()
                )))
            }
        };
        let ca = ca.or_else(|| profile.as_ref().and_then(|p| p.ca.clone()));
        let server_name = profile.and_then(|p| p.server_name);
        Ok(Self {
            brokers,
            ca,
            server_name,
            request_timeout: Duration::from_millis(arrowbus_wire::limits::REQUEST_TIMEOUT_MS),
        })
    }
}
