//! Loads a config, shows what validation reports for a broken one, and asks the
//! registry for a backend.
//!
//! ```sh
//! cargo run --example quickstart
//! ```

use voice_backends::{Config, ErrorCode, registry};

const GOOD: &str = r#"
provider = "local"
pipeline_type = "s2s"
s2s_provider = "echo"
latency_target = "300ms"
timeout = "10s"

[provider_config]
api_key = "sk-live-123"
"#;

const BROKEN: &str = r#"
provider = "local"
pipeline_type = "s2s"
latency_target = "50ms"
max_retries = 42
"#;

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let config = Config::from_toml_str(GOOD)?;
    println!("loaded (secrets redacted):\n{}", config.to_toml_string()?);

    match Config::from_toml_str(BROKEN) {
        Ok(_) => println!("the broken config was accepted?"),
        Err(e) => {
            println!("the broken config is refused, every problem at once:");
            for (path, problem) in &e.details {
                println!("  {path}: {problem}");
            }
        }
    }

    println!("\nproviders compiled in: {:?}", registry().list_providers());
    match registry().create(&config.provider, &config).await {
        Ok(backend) => println!("created a {} backend", backend.provider()),
        Err(e) if e.code == ErrorCode::ProviderNotFound => println!("{e}"),
        Err(e) => return Err(e.into()),
    }
    Ok(())
}
