//! Runs one parsed command: local ones directly, the rest as calls to the control
//! plane whose answers go through a view in [`crate::output`].

use std::{
    fs,
    io::{self, BufRead, Write},
    path::PathBuf,
    time::Duration,
};

use base64::Engine;
use cmk_proto::control::v1::{
    AddAwsKeyRequest, CreateKekRequest, CreateKekResponse, DecryptRequest, DecryptResponse,
    GenerateDataKeyRequest, GenerateDataKeyResponse, GetAwsSetupRequest, GetImportPublicKeyRequest,
    GetImportPublicKeyResponse, GetRotationRequest, KeyRequest, KeyResponse,
    ListAuditEventsRequest, ListAuditEventsResponse, ListKeysRequest, SetByokRequest,
    UploadKeyRequest, VerifyAuditLogRequest, WatchEventsRequest,
};
use cmk_secret::SecretBytes;
use sha2::{Digest, Sha256};

use crate::{
    cli::{
        Activate, AddAwsKeyArgs, AuditCommand, Cli, Command, ContentCommand, KeyId, OutputFormat,
        RotationCommand, Toggle, WrapArgs,
    },
    client::Client,
    config::Merged,
    error::Error,
    output::{
        self, AuditEventView, AuditListView, AwsSetupView, ByokView, DataKeyView, DecryptView,
        KekView, KeyResponseView, ListView, PreviewView, PublicKeyView, Render, RevokeView,
        RotationView, VerifyView, WrapView, print,
    },
    watch,
    wrap::{self, KeySource},
};

/// The most events the control plane returns in one page.
const MAX_AUDIT_PAGE: u64 = 1000;

/// Runs `cli`'s command.
pub async fn run(cli: Cli) -> Result<(), Error> {
    let Cli { global, command } = cli;
    let format = global.output;
    let connection = global.connection();
    match command {
        Command::Wrap(args) => wrap(args, format),
        Command::Config => print(format, &Merged::load(&connection)?),
        command => {
            let client = Client::connect(Merged::load(&connection)?.validate()?).await?;
            remote(&client, command, format).await
        }
    }
}

fn wrap(args: WrapArgs, format: OutputFormat) -> Result<(), Error> {
    let WrapArgs {
        public_key,
        key_file,
        generate,
        out,
    } = args;
    let source = match (key_file, generate) {
        (Some(path), None) => KeySource::File(path),
        (None, Some(path)) => KeySource::Generate(path),
        // clap's `master_key` group requires exactly one of the two.
        _ => unreachable!("clap requires exactly one of --key-file and --generate"),
    };
    let wrapped = wrap::wrap_to_file(&public_key, &source, &out)?;
    let (key_file, generated) = match source {
        KeySource::File(path) => (path, false),
        KeySource::Generate(path) => (path, true),
    };
    print(
        format,
        &WrapView {
            key_file,
            generated,
            key_check_value: wrapped.key_check_value,
            import_key_id: wrapped.import_key_id,
            modulus_bits: wrapped.modulus_bits,
            wrapped_to: out,
            wrapped_bytes: wrapped.wrapped_bytes,
        },
    )
}

async fn remote(client: &Client, command: Command, format: OutputFormat) -> Result<(), Error> {
    let org_id = client.org();
    match command {
        Command::PublicKey { out } => public_key(client, out, format).await,
        Command::Byok { setting } => {
            let request = SetByokRequest {
                org_id,
                enabled: setting == Toggle::On,
            };
            let response = client.call(client.admin().set_byok(request)).await?;
            print(format, &ByokView::from(response))
        }
        Command::Upload {
            wrapped,
            activate,
            import_key_id,
        } => {
            let request = UploadKeyRequest {
                org_id,
                wrapped_key: read_file(wrapped)?,
                activate_now: activate == Activate::Now,
                import_key_id: import_key_id.unwrap_or_default(),
            };
            let response = client.call(client.admin().upload_key(request)).await?;
            print(format, &KeyResponseView::from(response))
        }
        Command::AddAwsKey(AddAwsKeyArgs {
            key_arn,
            backup_key_arn,
            role_arn,
            activate_now,
        }) => {
            let request = AddAwsKeyRequest {
                org_id,
                key_arn,
                backup_key_arn: backup_key_arn.unwrap_or_default(),
                role_arn: role_arn.unwrap_or_default(),
                activate_now,
            };
            let response = client.call(client.admin().add_aws_key(request)).await?;
            print(format, &KeyResponseView::from(response))
        }
        Command::AwsSetup { key_arns } => {
            let request = GetAwsSetupRequest { org_id, key_arns };
            let response = client.call(client.admin().get_aws_setup(request)).await?;
            print(format, &AwsSetupView::from(response))
        }
        Command::Activate(KeyId { key_id }) => {
            key_call(client, KeyCall::Activate, key_id, format).await
        }
        Command::Cancel(KeyId { key_id }) => {
            key_call(client, KeyCall::Cancel, key_id, format).await
        }
        Command::Reactivate(KeyId { key_id }) => {
            key_call(client, KeyCall::Reactivate, key_id, format).await
        }
        Command::Delete(KeyId { key_id }) => {
            key_call(client, KeyCall::Delete, key_id, format).await
        }
        Command::Restore(KeyId { key_id }) => {
            key_call(client, KeyCall::Restore, key_id, format).await
        }
        Command::Get(KeyId { key_id }) => key_call(client, KeyCall::Get, key_id, format).await,
        Command::List => {
            let response = client
                .call(client.admin().list_keys(ListKeysRequest { org_id }))
                .await?;
            print(format, &ListView::from(response))
        }
        Command::Revoke { key_id, yes } => revoke(client, key_id, yes, format).await,
        Command::Rotation(RotationCommand::Show) => {
            let rotation = client
                .call(client.admin().get_rotation(GetRotationRequest { org_id }))
                .await?;
            print(format, &RotationView::from(rotation))
        }
        Command::Rotation(RotationCommand::Watch { interval_ms }) => {
            watch::watch(client, Duration::from_millis(interval_ms), format).await
        }
        Command::Audit(AuditCommand::List { after, limit }) => {
            audit_list(client, after, limit, format).await
        }
        Command::Audit(AuditCommand::Follow { after }) => audit_follow(client, after, format).await,
        Command::Audit(AuditCommand::Verify) => {
            let response = client
                .call(
                    client
                        .admin()
                        .verify_audit_log(VerifyAuditLogRequest { org_id }),
                )
                .await?;
            let view = VerifyView::from(response);
            print(format, &view)?;
            match view.intact {
                true => Ok(()),
                false => Err(Error::AuditChainBroken {
                    problem: view
                        .problem
                        .unwrap_or_else(|| "the control plane gave no detail".to_string()),
                }),
            }
        }
        Command::Content(command) => content(client, command, format).await,
        Command::Wrap(_) | Command::Config => unreachable!("local commands are run in `run`"),
    }
}

async fn public_key(
    client: &Client,
    out: Option<PathBuf>,
    format: OutputFormat,
) -> Result<(), Error> {
    let request = GetImportPublicKeyRequest {
        org_id: client.org(),
    };
    let GetImportPublicKeyResponse {
        public_key_pem,
        key_id,
        algorithm,
        modulus_bits,
    } = client
        .call(client.admin().get_import_public_key(request))
        .await?;
    if let Some(path) = &out {
        fs::write(path, &public_key_pem).map_err(|source| Error::File {
            action: "write",
            path: path.clone(),
            source,
        })?;
    }
    let view = PublicKeyView {
        key_id,
        algorithm,
        modulus_bits,
        public_key_pem,
        written_to: out,
    };
    match (format, &view.written_to) {
        (OutputFormat::Table, None) => {
            // The PEM alone on standard output, so that `> pub.pem` captures it.
            output::write_stdout(&view.public_key_pem)?;
            eprint!("{}", view.table());
            Ok(())
        }
        _ => print(format, &view),
    }
}

/// The calls that take a key id and answer a key.
#[derive(Clone, Copy, Debug)]
enum KeyCall {
    Activate,
    Cancel,
    Reactivate,
    Delete,
    Restore,
    Get,
}

async fn key_call(
    client: &Client,
    call: KeyCall,
    key_id: String,
    format: OutputFormat,
) -> Result<(), Error> {
    let request = KeyRequest {
        org_id: client.org(),
        key_id,
    };
    let mut admin = client.admin();
    let response: KeyResponse = client
        .call(async {
            match call {
                KeyCall::Activate => admin.activate_key(request).await,
                KeyCall::Cancel => admin.cancel_key(request).await,
                KeyCall::Reactivate => admin.reactivate_key(request).await,
                KeyCall::Delete => admin.delete_key(request).await,
                KeyCall::Restore => admin.restore_key(request).await,
                KeyCall::Get => admin.get_key(request).await,
            }
        })
        .await?;
    print(format, &KeyResponseView::from(response))
}

async fn revoke(
    client: &Client,
    key_id: String,
    yes: bool,
    format: OutputFormat,
) -> Result<(), Error> {
    let request = || KeyRequest {
        org_id: client.org(),
        key_id: key_id.clone(),
    };
    let preview = PreviewView::from(
        client
            .call(client.admin().preview_revocation(request()))
            .await?,
    );
    if !preview.revocable {
        return Err(Error::NotRevocable {
            key_id,
            state: preview.key.as_ref().map_or("unknown", |key| key.state),
        });
    }
    if !yes
        && !confirm(&format!(
            "Revoke {key_id}? {} Type 'yes' to continue: ",
            preview.consequence()
        ))?
    {
        return Err(Error::Aborted(format!("{key_id} was not revoked")));
    }
    let revoked = client.call(client.admin().revoke_key(request())).await?;
    print(
        format,
        &RevokeView {
            preview,
            revoked: revoked.into(),
        },
    )
}

/// Asks on standard error and reads one line from standard input: only "yes" or
/// "y" (any case) confirms; end of input does not.
fn confirm(prompt: &str) -> Result<bool, Error> {
    let mut stderr = io::stderr();
    // A prompt that cannot be shown is not a reason to refuse the answer.
    let _ = stderr
        .write_all(prompt.as_bytes())
        .and_then(|()| stderr.flush());
    let mut answer = String::new();
    io::stdin()
        .lock()
        .read_line(&mut answer)
        .map_err(|source| Error::File {
            action: "read",
            path: PathBuf::from("standard input"),
            source,
        })?;
    if !answer.ends_with('\n') {
        // The input ended without a newline: end the prompt's line.
        let _ = writeln!(stderr);
    }
    Ok(matches!(
        answer.trim().to_ascii_lowercase().as_str(),
        "yes" | "y"
    ))
}

/// Prints each audit event as it arrives, one per line (a JSON object per
/// line with `--output json`), until the stream ends or cmkctl is stopped.
async fn audit_follow(client: &Client, after: u64, format: OutputFormat) -> Result<(), Error> {
    let request = WatchEventsRequest {
        org_id: client.org(),
        after_seq: after,
    };
    let mut events = client.call(client.admin().watch_events(request)).await?;
    loop {
        match events.message().await {
            Ok(Some(event)) => {
                output::write_stdout(&output::event_line(format, &AuditEventView::from(event)))?
            }
            Ok(None) => return Ok(()),
            Err(status) => return Err(Error::Status(status)),
        }
    }
}

async fn audit_list(
    client: &Client,
    after: u64,
    limit: Option<u64>,
    format: OutputFormat,
) -> Result<(), Error> {
    let mut events: Vec<AuditEventView> = Vec::new();
    let mut after_seq = after;
    let mut next_after_seq = None;
    loop {
        let remaining = limit.map(|limit| limit.saturating_sub(events.len() as u64));
        if remaining == Some(0) {
            break;
        }
        let request = ListAuditEventsRequest {
            org_id: client.org(),
            after_seq,
            page_size: remaining.map_or(MAX_AUDIT_PAGE, |r| r.min(MAX_AUDIT_PAGE)) as u32,
        };
        let ListAuditEventsResponse {
            events: page,
            next_after_seq: next,
        } = client
            .call(client.admin().list_audit_events(request))
            .await?;
        let empty = page.is_empty();
        events.extend(page.into_iter().map(AuditEventView::from));
        if let Some(limit) = limit.filter(|&limit| events.len() as u64 > limit) {
            // More than asked for: keep the limit and continue after the last kept.
            events.truncate(limit as usize);
            next_after_seq = events.last().map(|event| event.seq);
            break;
        }
        next_after_seq = (next != 0).then_some(next);
        match next_after_seq {
            // A page that makes no progress would loop forever; stop instead.
            Some(next) if next > after_seq && !empty => after_seq = next,
            _ => break,
        }
    }
    print(
        format,
        &AuditListView {
            events,
            next_after_seq,
        },
    )
}

async fn content(
    client: &Client,
    command: ContentCommand,
    format: OutputFormat,
) -> Result<(), Error> {
    let org_id = client.org();
    match command {
        ContentCommand::Kek { resource } => {
            let CreateKekResponse {
                kek_id,
                resource,
                key_id,
                created,
                created_at,
            } = client
                .call(
                    client
                        .content()
                        .create_kek(CreateKekRequest { org_id, resource }),
                )
                .await?;
            print(
                format,
                &KekView {
                    kek_id,
                    resource,
                    key_id,
                    created,
                    created_at: output::Time::from_proto(created_at),
                },
            )
        }
        ContentCommand::Generate { kek, context } => {
            let request = GenerateDataKeyRequest {
                org_id,
                kek_id: kek,
                context: context.into_bytes(),
            };
            let GenerateDataKeyResponse {
                plaintext,
                wrapped_key,
                kek_id,
            } = client
                .call(client.content().generate_data_key(request))
                .await?;
            let plaintext = SecretBytes::new(plaintext);
            print(
                format,
                &DataKeyView {
                    kek_id,
                    wrapped_key: base64::engine::general_purpose::STANDARD.encode(wrapped_key),
                    content_key_fingerprint: fingerprint(&plaintext),
                },
            )
        }
        ContentCommand::Decrypt { wrapped, context } => {
            let wrapped_key = base64::engine::general_purpose::STANDARD
                .decode(wrapped.trim())
                .map_err(|err| Error::Input(format!("--wrapped is not standard base64: {err}")))?;
            let request = DecryptRequest {
                org_id,
                wrapped_key,
                context: context.into_bytes(),
            };
            let DecryptResponse { plaintext, kek_id } =
                client.call(client.content().decrypt(request)).await?;
            let plaintext = SecretBytes::new(plaintext);
            print(
                format,
                &DecryptView {
                    kek_id,
                    content_key_fingerprint: fingerprint(&plaintext),
                },
            )
        }
    }
}

/// First 8 bytes of the SHA-256 of a content key, hex: enough to see that two keys
/// match, nothing that helps recover one.
fn fingerprint(key: &SecretBytes) -> String {
    hex::encode(&Sha256::digest(key.expose())[..8])
}

fn read_file(path: PathBuf) -> Result<Vec<u8>, Error> {
    fs::read(&path).map_err(|source| Error::File {
        action: "read",
        path,
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fingerprint_is_the_first_8_bytes_of_sha256() {
        // SHA-256 of 32 zero bytes is 66687aadf862bd77….
        assert_eq!(
            fingerprint(&SecretBytes::new(vec![0; 32])),
            "66687aadf862bd77"
        );
    }
}
