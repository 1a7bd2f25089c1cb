//! Logged-in sessions on the token, handed out one per call, and the recovery
//! from a token or module that failed underneath them.
//!
//! PKCS#11 calls block, so each runs on tokio's blocking pool, holding one of
//! `sessions` permits: at most that many calls are in the token at once, and a
//! call waits at most the configured timeout for a permit and again for the
//! token. A call the token does not answer in time is reported
//! [`CustodyError::Unavailable`]; its thread keeps its permit until the token
//! returns, so a hung token cannot grow the number of threads.
//!
//! An error that says the session, the login or the token is gone
//! ([`is_connection_failure`]) closes every idle session and starts a new
//! *generation*: the next call finds the slot again (a re-inserted token may
//! have a new slot id), opens a fresh session and logs in. Sessions of an old
//! generation are dropped when their call returns, and object handles cached
//! under it are not trusted. The call that met the failure is reported
//! [`CustodyError::Unavailable`]; nothing is retried behind the caller's back.

use std::{
    path::PathBuf,
    sync::{Arc, Mutex, MutexGuard, PoisonError},
    time::Duration,
};

use cmk_hsm_custody::CustodyError;
use cmk_secret::SecretBytes;
use cryptoki::{
    context::{CInitializeArgs, CInitializeFlags, Pkcs11},
    error::{Error, RvError},
    session::{Session, UserType},
    slot::Slot,
    types::RawAuthPin,
};
use tokio::sync::Semaphore;
use tracing::{error, info, warn};

use crate::{Pkcs11Settings, TokenSelector};

/// Why a call on a session failed.
#[derive(Debug)]
pub(crate) enum Fail {
    /// A refusal or failure the backend has already put in custody terms.
    Custody(CustodyError),
    /// A PKCS#11 call failed in a way the operation did not expect.
    Token {
        /// The PKCS#11 function, for the log.
        call: &'static str,
        /// What it returned.
        error: Error,
    },
}

impl From<CustodyError> for Fail {
    fn from(err: CustodyError) -> Self {
        Self::Custody(err)
    }
}

impl From<cmk_hsm_custody::ImportError> for Fail {
    fn from(err: cmk_hsm_custody::ImportError) -> Self {
        Self::Custody(err.into())
    }
}

/// `.map_err(token("C_Encrypt"))`: an unexpected PKCS#11 error.
pub(crate) fn token(call: &'static str) -> impl FnOnce(Error) -> Fail {
    move |error| Fail::Token { call, error }
}

/// The return value of a failed PKCS#11 call, if it was one.
pub(crate) fn rv(error: &Error) -> Option<RvError> {
    match error {
        Error::Pkcs11(rv, _) => Some(*rv),
        _ => None,
    }
}

/// `CKR_…` name of a return value, as PKCS#11 documentation spells it.
pub(crate) fn ckr_name(rv: RvError) -> String {
    let camel = format!("{rv:?}");
    let mut name = String::from("CKR");
    for c in camel.chars() {
        if c.is_ascii_uppercase() {
            name.push('_');
        }
        name.push(c.to_ascii_uppercase());
    }
    name
}

/// Whether `error` means that the session, its login, the token or the module
/// is gone, rather than that this one operation was refused.
pub(crate) fn is_connection_failure(error: &Error) -> bool {
    use RvError::*;
    matches!(
        rv(error),
        Some(
            SessionHandleInvalid
                | SessionClosed
                | SessionCount
                | DeviceRemoved
                | DeviceError
                | DeviceMemory
                | TokenNotPresent
                | TokenNotRecognized
                | UserNotLoggedIn
                | CryptokiNotInitialized
                | PinExpired
        )
    )
}

/// A session lent to one call.
pub(crate) struct Lease {
    pub(crate) session: Session,
    /// The generation the session was opened in.
    pub(crate) generation: u64,
}

/// The sessions of one token.
pub(crate) struct Pool {
    module: PathBuf,
    token: TokenSelector,
    pin: SecretBytes,
    timeout: Duration,
    sessions: usize,
    permits: Arc<Semaphore>,
    state: Mutex<State>,
}

struct State {
    pkcs11: Pkcs11,
    slot: Option<Slot>,
    idle: Vec<Session>,
    generation: u64,
    /// Set when the module itself reported that it is not initialised.
    reinitialise: bool,
}

impl Pool {
    /// Loads and initialises the module and logs in once, so that a wrong
    /// module, token or PIN stops the daemon at start. Blocking.
    pub(crate) fn open(settings: &Pkcs11Settings) -> Result<Self, CustodyError> {
        let pkcs11 = Pkcs11::new(&settings.module).map_err(|e| {
            CustodyError::Unavailable(format!(
                "cannot load the PKCS#11 module {}: {e}",
                settings.module.display()
            ))
        })?;
        initialise(&pkcs11).map_err(|e| {
            CustodyError::Unavailable(format!(
                "the PKCS#11 module {} failed to initialise: {}",
                settings.module.display(),
                describe(&e)
            ))
        })?;
        let pool = Self {
            module: settings.module.clone(),
            token: settings.token.clone(),
            pin: settings.pin.clone(),
            timeout: settings.timeout,
            sessions: settings.sessions.max(1),
            permits: Arc::new(Semaphore::new(settings.sessions.max(1))),
            state: Mutex::new(State {
                pkcs11,
                slot: None,
                idle: Vec::new(),
                generation: 0,
                reinitialise: false,
            }),
        };
        let lease = pool.checkout().map_err(|e| match e {
            Fail::Custody(e) => e,
            Fail::Token { call, error } => CustodyError::Unavailable(format!(
                "{call} on {} failed: {}",
                pool.token,
                describe(&error)
            )),
        })?;
        pool.checkin(lease);
        info!(module = %pool.module.display(), token = %pool.token, sessions = pool.sessions,
            "logged in to the PKCS#11 token");
        Ok(pool)
    }

    /// Runs `work` on a logged-in session off the async threads, within the
    /// timeout (see the module documentation).
    pub(crate) async fn run<T, F>(
        self: &Arc<Self>,
        what: &'static str,
        work: F,
    ) -> Result<T, CustodyError>
    where
        T: Send + 'static,
        F: FnOnce(&Lease) -> Result<T, Fail> + Send + 'static,
    {
        let permit = tokio::time::timeout(self.timeout, self.permits.clone().acquire_owned())
            .await
            .map_err(|_| {
                CustodyError::Unavailable(format!(
                    "all {} PKCS#11 sessions stayed busy for {:?}",
                    self.sessions, self.timeout
                ))
            })?
            .map_err(|_| CustodyError::Unavailable("the PKCS#11 session pool is closed".into()))?;
        let pool = self.clone();
        let job = tokio::task::spawn_blocking(move || {
            let _permit = permit;
            pool.within_session(what, work)
        });
        match tokio::time::timeout(self.timeout, job).await {
            Ok(Ok(result)) => result,
            Ok(Err(_)) => Err(CustodyError::Crypto("PKCS#11 worker task failed")),
            Err(_) => {
                warn!(what, timeout = ?self.timeout, "the PKCS#11 token did not answer in time");
                Err(CustodyError::Unavailable(format!(
                    "the PKCS#11 token did not answer within {:?} ({what})",
                    self.timeout
                )))
            }
        }
    }

    /// Runs `work` on a logged-in session on this thread.
    pub(crate) fn within_session<T>(
        &self,
        what: &'static str,
        work: impl FnOnce(&Lease) -> Result<T, Fail>,
    ) -> Result<T, CustodyError> {
        let lease = match self.checkout() {
            Ok(lease) => lease,
            Err(fail) => return Err(self.failed(what, None, fail)),
        };
        match work(&lease) {
            Ok(value) => {
                self.checkin(lease);
                Ok(value)
            }
            Err(fail) => Err(self.failed(what, Some(lease), fail)),
        }
    }

    /// Puts a failure in custody terms, and starts a new generation when the
    /// session or token is gone.
    fn failed(&self, what: &'static str, lease: Option<Lease>, fail: Fail) -> CustodyError {
        match fail {
            Fail::Custody(err) => {
                if let Some(lease) = lease {
                    self.checkin(lease);
                }
                err
            }
            Fail::Token { call, error } if is_connection_failure(&error) => {
                let generation = lease.as_ref().map(|l| l.generation);
                drop(lease);
                self.reset(generation, &error);
                warn!(what, call, error = %describe(&error), "PKCS#11 session lost; reconnecting");
                CustodyError::Unavailable(format!(
                    "the PKCS#11 token failed ({call}: {}); reconnecting",
                    describe(&error)
                ))
            }
            Fail::Token { call, error } => {
                if let Some(lease) = lease {
                    self.checkin(lease);
                }
                error!(what, call, error = %describe(&error), "PKCS#11 call failed");
                CustodyError::Crypto("a PKCS#11 call failed; see the daemon log")
            }
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// An idle session, or a new one logged in.
    fn checkout(&self) -> Result<Lease, Fail> {
        let mut state = self.lock();
        let generation = state.generation;
        if let Some(session) = state.idle.pop() {
            return Ok(Lease {
                session,
                generation,
            });
        }
        if state.reinitialise {
            match initialise(&state.pkcs11) {
                Ok(()) => state.reinitialise = false,
                Err(error) => return Err(token("C_Initialize")(error)),
            }
        }
        let slot = match state.slot {
            Some(slot) => slot,
            None => {
                let slot = find_slot(&state.pkcs11, &self.token)?;
                state.slot = Some(slot);
                slot
            }
        };
        let session = state
            .pkcs11
            .open_rw_session(slot)
            .map_err(token("C_OpenSession"))?;
        // Login is per application, not per session: a second session finds
        // the token logged in already.
        let pin = RawAuthPin::new(Box::new(self.pin.expose().to_vec()));
        match session.login_with_raw(UserType::User, &pin) {
            Ok(()) | Err(Error::Pkcs11(RvError::UserAlreadyLoggedIn, _)) => {}
            Err(Error::Pkcs11(rv @ (RvError::PinIncorrect | RvError::PinLocked), _)) => {
                return Err(Fail::Custody(CustodyError::Unavailable(format!(
                    "login to {} refused: {} (check the configured PIN)",
                    self.token,
                    ckr_name(rv)
                ))));
            }
            Err(error) => return Err(token("C_Login")(error)),
        }
        Ok(Lease {
            session,
            generation,
        })
    }

    fn checkin(&self, lease: Lease) {
        let mut state = self.lock();
        if lease.generation == state.generation && state.idle.len() < self.sessions {
            state.idle.push(lease.session);
        }
    }

    /// Forgets every idle session and the slot, once per failed generation.
    fn reset(&self, failed: Option<u64>, error: &Error) {
        let mut state = self.lock();
        if failed.is_some_and(|g| g != state.generation) {
            return;
        }
        state.generation += 1;
        state.slot = None;
        // Closing may fail on a dead token; cryptoki logs that and moves on.
        state.idle.clear();
        if rv(error) == Some(RvError::CryptokiNotInitialized) {
            state.reinitialise = true;
        }
    }
}

fn initialise(pkcs11: &Pkcs11) -> Result<(), Error> {
    match pkcs11.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK)) {
        Ok(()) | Err(Error::Pkcs11(RvError::CryptokiAlreadyInitialized, _)) => Ok(()),
        Err(error) => Err(error),
    }
}

fn find_slot(pkcs11: &Pkcs11, selector: &TokenSelector) -> Result<Slot, Fail> {
    let slots = pkcs11
        .get_slots_with_initialized_token()
        .map_err(token("C_GetSlotList"))?;
    let mut found = Vec::new();
    for slot in slots {
        let matches = match selector {
            TokenSelector::Slot(id) => slot.id() == *id,
            TokenSelector::Label(label) => {
                let info = pkcs11
                    .get_token_info(slot)
                    .map_err(token("C_GetTokenInfo"))?;
                info.label() == label
            }
        };
        if matches {
            found.push(slot);
        }
    }
    match found.as_slice() {
        [slot] => Ok(*slot),
        [] => Err(Fail::Custody(CustodyError::Unavailable(format!(
            "no initialised PKCS#11 token: {selector} not found"
        )))),
        _ => Err(Fail::Custody(CustodyError::Unavailable(format!(
            "{selector} is ambiguous: {} tokens match; select it by slot",
            found.len()
        )))),
    }
}

/// A cryptoki error for the log and for messages: the `CKR_…` name and the
/// function, never an argument.
pub(crate) fn describe(error: &Error) -> String {
    match error {
        Error::Pkcs11(rv, function) => format!("{} from {function:?}", ckr_name(*rv)),
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn return_values_are_named_as_pkcs11_names_them() {
        assert_eq!(ckr_name(RvError::ArgumentsBad), "CKR_ARGUMENTS_BAD");
        assert_eq!(
            ckr_name(RvError::SessionHandleInvalid),
            "CKR_SESSION_HANDLE_INVALID"
        );
    }
}
