//! Who may connect: no password on loopback by default, SCRAM-SHA-256 when one is set.

use std::sync::Arc;

use datafusion_postgres::pgwire::api::auth::noop::NoopStartupHandler;
use datafusion_postgres::pgwire::api::auth::sasl::{SASLAuthStartupHandler, scram};
use datafusion_postgres::pgwire::api::auth::{
    AuthSource, DefaultServerParameterProvider, LoginInfo, Password, StartupHandler,
};
use datafusion_postgres::pgwire::api::{ClientInfo, ConnectionManager};
use datafusion_postgres::pgwire::error::{PgWireError, PgWireResult};
use datafusion_postgres::pgwire::messages::{PgWireBackendMessage, PgWireFrontendMessage};
use futures::Sink;

/// How a connection starts: open (the endpoint is on loopback), or by SCRAM-SHA-256.
pub(super) enum Startup {
    Open(OpenStartup),
    Scram(Box<SASLAuthStartupHandler<DefaultServerParameterProvider>>),
}

#[async_trait::async_trait]
impl StartupHandler for Startup {
    async fn on_startup<C>(
        &self,
        client: &mut C,
        message: PgWireFrontendMessage,
    ) -> PgWireResult<()>
    where
        C: ClientInfo + Sink<PgWireBackendMessage> + Unpin + Send + Sync,
        C::Error: std::fmt::Debug,
        PgWireError: From<<C as Sink<PgWireBackendMessage>>::Error>,
    {
        match self {
            Startup::Open(open) => open.on_startup(client, message).await,
            Startup::Scram(scram) => scram.on_startup(client, message).await,
        }
    }
}

/// Accepts every client (loopback only) and registers it for cancel requests.
pub(super) struct OpenStartup {
    pub(super) connections: Arc<ConnectionManager>,
}

#[async_trait::async_trait]
impl NoopStartupHandler for OpenStartup {
    fn connection_manager(&self) -> Option<Arc<ConnectionManager>> {
        Some(self.connections.clone())
    }
}

/// The one user's password, salted and hashed once as SCRAM-SHA-256 wants it.
pub(super) struct Scram {
    pub(super) user: String,
    pub(super) salt: Vec<u8>,
    pub(super) salted: Vec<u8>,
}

impl std::fmt::Debug for Scram {
    // The salted password opens the door as the password does: never printed.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Scram").field("user", &self.user).finish()
    }
}

/// PBKDF2 rounds of the salted password (RFC 7677's minimum, Postgres' default).
pub(super) const SCRAM_ITERATIONS: usize = 4096;

impl Scram {
    pub(super) fn new(auth: &crate::config::PgAuth) -> Scram {
        let salt = scram::random_nonce().into_bytes();
        let salted = scram::gen_salted_password(&auth.password, &salt, SCRAM_ITERATIONS);
        Scram {
            user: auth.user.clone(),
            salt,
            salted,
        }
    }
}

#[async_trait::async_trait]
impl AuthSource for Scram {
    async fn get_password(&self, login: &LoginInfo) -> PgWireResult<Password> {
        match login.user() {
            Some(user) if user == self.user => {
                Ok(Password::new(Some(self.salt.clone()), self.salted.clone()))
            }
            Some(user) => Err(PgWireError::InvalidPassword(user.to_owned())),
            None => Err(PgWireError::UserNameRequired),
        }
    }
}
