//! Credentials for a registry, read where Docker keeps them: `$DOCKER_CONFIG/config.json`,
//! else `~/.docker/config.json` (`auths` entries with a base64 `auth` or a username and
//! password, and the credential helpers `credHelpers` and `credsStore` name), through the
//! `docker_credential` crate. No file, or no entry for the registry, is anonymous access.

use std::fs::File;
use std::io::BufReader;
use std::path::PathBuf;

use docker_credential::{CredentialRetrievalError, DockerCredential};
use oci_client::secrets::RegistryAuth;

use super::RegistryError;

/// The Docker config file graven reads credentials from, as Docker finds it.
pub fn config_file() -> Option<PathBuf> {
    let dir = std::env::var_os("DOCKER_CONFIG")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .or_else(|| {
            std::env::var_os("HOME")
                .filter(|v| !v.is_empty())
                .map(|home| PathBuf::from(home).join(".docker"))
        })?;
    Some(dir.join("config.json"))
}

/// The credentials for `registry` (`host[:port]`, `index.docker.io` for Docker Hub).
pub fn credentials(registry: &str) -> Result<RegistryAuth, RegistryError> {
    credentials_in(config_file(), registry)
}

/// The credentials for `registry` in the Docker config file `path`.
fn credentials_in(path: Option<PathBuf>, registry: &str) -> Result<RegistryAuth, RegistryError> {
    let Some(path) = path.filter(|p| p.exists()) else {
        return Ok(RegistryAuth::Anonymous);
    };
    let bad = |reason: String| RegistryError::Credentials {
        registry: registry.to_owned(),
        path: path.clone(),
        reason,
    };
    let file = File::open(&path).map_err(|e| bad(e.to_string()))?;
    // Docker keys Docker Hub by its old index URL, in `auths` and for credential helpers.
    let server = if registry == "index.docker.io" {
        "https://index.docker.io/v1/"
    } else {
        registry
    };
    match docker_credential::get_credential_from_reader(BufReader::new(file), server) {
        Ok(DockerCredential::UsernamePassword(user, password)) => {
            Ok(RegistryAuth::Basic(user, password))
        }
        // An identity token is an OAuth refresh token, which the client cannot exchange.
        Ok(DockerCredential::IdentityToken(_)) => Err(bad(
            "it holds an identity token (an OAuth refresh token), which graven cannot use; log in with a username and password or token".to_owned(),
        )),
        Err(CredentialRetrievalError::NoCredentialConfigured) => Ok(RegistryAuth::Anonymous),
        Err(CredentialRetrievalError::ConfigReadError) => {
            Err(bad("it is not a valid Docker config file".to_owned()))
        }
        Err(e) => Err(bad(e.to_string().to_lowercase().trim_end().to_owned())),
    }
}

/// Fills in an `Unauthorized` error's hint: which credentials were sent, and from where.
pub fn explain(error: RegistryError, sent: &RegistryAuth) -> RegistryError {
    let RegistryError::Unauthorized {
        reference,
        registry,
        hint: _,
    } = error
    else {
        return error;
    };
    let file = config_file().map_or_else(
        || "no Docker config file ($DOCKER_CONFIG and $HOME are unset)".to_owned(),
        |p| p.display().to_string(),
    );
    let hint = match sent {
        RegistryAuth::Anonymous => {
            format!("graven sent no credentials: {file} has none for {registry}")
        }
        RegistryAuth::Basic(user, _) => {
            format!("it refused user {user:?} (from {file})")
        }
        RegistryAuth::Bearer(_) => format!("it refused the token from {file}"),
    };
    RegistryError::Unauthorized {
        reference,
        registry,
        hint,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(config: &str, registry: &str) -> Result<RegistryAuth, RegistryError> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.json");
        std::fs::write(&path, config).unwrap();
        credentials_in(Some(path), registry)
    }

    #[test]
    fn docker_config_entries_as_docker_reads_them() {
        // base64("ci:pw") and base64("hub:pw").
        let config = r#"{"auths": {
            "registry.example:5000": {"auth": "Y2k6cHc="},
            "https://index.docker.io/v1/": {"auth": "aHViOnB3"},
            "tokens.example": {"identitytoken": "refresh"}
        }}"#;
        let found = check(config, "registry.example:5000").unwrap();
        assert!(matches!(&found, RegistryAuth::Basic(u, p) if u == "ci" && p == "pw"));
        let hub = check(config, "index.docker.io").unwrap();
        assert!(matches!(&hub, RegistryAuth::Basic(u, _) if u == "hub"));
        assert!(matches!(
            check(config, "other.example").unwrap(),
            RegistryAuth::Anonymous
        ));
        assert!(matches!(
            credentials_in(None, "registry.example:5000").unwrap(),
            RegistryAuth::Anonymous
        ));
        let token = check(config, "tokens.example").unwrap_err().to_string();
        assert!(token.contains("identity token"), "{token}");
        let broken = check("{not json", "registry.example:5000")
            .unwrap_err()
            .to_string();
        assert!(
            broken.contains("not a valid Docker config file"),
            "{broken}"
        );
    }
}
