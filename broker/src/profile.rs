//! The client profile `busd dev` writes so that `busctl` and the clients
//! connect with no flags. Format (TOML), read by `arrowbus::Profile`:
//!
//! ```toml
//! brokers = ["127.0.0.1:7447"]
//! ca = "/home/me/.local/share/arrowbus/dev/tls/ca.pem"
//! server_name = "localhost"
//! ```

use std::path::{Path, PathBuf};

/// `$ARROWBUS_CONFIG_DIR/profile.toml`, else `~/.config/arrowbus/profile.toml`.
pub fn default_profile_path() -> PathBuf {
    config_dir().join("profile.toml")
}

pub fn config_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("ARROWBUS_CONFIG_DIR") {
        return PathBuf::from(d);
    }
    home().join(".config").join("arrowbus")
}

pub fn home() -> PathBuf {
    std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("."))
}

/// Write the profile atomically (a client never reads half a file).
pub fn write_profile(
    path: &Path,
    brokers: &[String],
    ca: &Path,
    server_name: &str,
) -> std::io::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let list = brokers
        .iter()
        .map(|b| format!("{:?}", b))
        .collect::<Vec<_>>()
        .join(", ");
    let text = format!(
        "# Written by `busd dev`. busctl and the arrowbus clients read it when no\n\
         # broker is given. Delete it to forget this broker.\n\
         brokers = [{list}]\n\
         ca = {:?}\n\
         server_name = {:?}\n",
        ca.display().to_string(),
        server_name
    );
    let tmp = path.with_extension("toml.tmp");
    std::fs::write(&tmp, text)?;
    std::fs::rename(&tmp, path)
}
