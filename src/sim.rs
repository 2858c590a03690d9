//! A simulated Modbus TCP device for the demo and the tests: real tokio-modbus server side on
//! loopback, with register banks the caller can change while it runs.

use std::collections::HashMap;
use std::future;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_modbus::prelude::{ExceptionCode, Request, Response, SlaveRequest};
use tokio_modbus::server::Service;
use tokio_modbus::server::tcp::{Server, accept_tcp_connection};

/// The data of one simulated unit. Unset addresses answer with IllegalDataAddress.
#[derive(Debug, Default, Clone)]
pub struct Bank {
    pub holding: HashMap<u16, u16>,
    pub input: HashMap<u16, u16>,
    pub coils: HashMap<u16, bool>,
    pub discrete: HashMap<u16, bool>,
}

impl Bank {
    /// Writes `words` to consecutive holding registers from `addr`.
    pub fn set_holding(&mut self, addr: u16, words: &[u16]) {
        for (i, w) in words.iter().enumerate() {
            self.holding.insert(addr + i as u16, *w);
        }
    }

    pub fn set_input(&mut self, addr: u16, words: &[u16]) {
        for (i, w) in words.iter().enumerate() {
            self.input.insert(addr + i as u16, *w);
        }
    }
}

/// Shared state of the simulator: one bank per unit id, and knobs for fault injection.
#[derive(Debug, Default)]
pub struct State {
    pub units: HashMap<u8, Bank>,
    /// Units that never answer (the request times out).
    pub silent: Vec<u8>,
    /// Added before every answer.
    pub delay: Duration,
    /// Requests served, for tests.
    pub requests: u64,
}

#[derive(Clone)]
pub struct Simulator {
    pub state: Arc<Mutex<State>>,
    pub addr: SocketAddr,
}

impl Simulator {
    /// Starts serving on `127.0.0.1:0` (or `addr`).
    pub async fn start(addr: Option<SocketAddr>) -> std::io::Result<Simulator> {
        let listener =
            TcpListener::bind(addr.unwrap_or_else(|| "127.0.0.1:0".parse().expect("valid")))
                .await?;
        let addr = listener.local_addr()?;
        let state = Arc::new(Mutex::new(State::default()));
        let server = Server::new(listener);
        let st = state.clone();
        tokio::spawn(async move {
            let new_service = |_socket_addr| Ok(Some(Handler { state: st.clone() }));
            let on_connected = |stream, socket_addr| async move {
                accept_tcp_connection(stream, socket_addr, new_service)
            };
            if let Err(e) = server.serve(&on_connected, |_err| {}).await {
                tracing::warn!(error = %e, "simulator stopped");
            }
        });
        Ok(Simulator { state, addr })
    }

    /// Changes the bank of `unit` (created if new).
    pub fn with_unit<R>(&self, unit: u8, f: impl FnOnce(&mut Bank) -> R) -> R {
        let mut st = self.state.lock().expect("not poisoned");
        f(st.units.entry(unit).or_default())
    }

    pub fn requests(&self) -> u64 {
        self.state.lock().expect("not poisoned").requests
    }
}

#[derive(Clone)]
struct Handler {
    state: Arc<Mutex<State>>,
}

type Answer = Result<Option<Response>, ExceptionCode>;

impl Service for Handler {
    type Request = SlaveRequest<'static>;
    type Response = Option<Response>;
    type Exception = ExceptionCode;
    type Future = std::pin::Pin<Box<dyn future::Future<Output = Answer> + Send>>;

    fn call(&self, req: Self::Request) -> Self::Future {
        let (answer, delay) = {
            let mut st = self.state.lock().expect("not poisoned");
            st.requests += 1;
            if st.silent.contains(&req.slave) {
                (Ok(None), Duration::ZERO)
            } else {
                (answer(&st, req.slave, &req.request), st.delay)
            }
        };
        Box::pin(async move {
            if !delay.is_zero() {
                tokio::time::sleep(delay).await;
            }
            answer
        })
    }
}

fn answer(st: &State, unit: u8, req: &Request<'_>) -> Answer {
    let Some(bank) = st.units.get(&unit) else {
        return Err(ExceptionCode::GatewayTargetDevice);
    };
    fn words(map: &HashMap<u16, u16>, start: u16, n: u16) -> Result<Vec<u16>, ExceptionCode> {
        (0..n)
            .map(|i| {
                map.get(&(start + i))
                    .copied()
                    .ok_or(ExceptionCode::IllegalDataAddress)
            })
            .collect()
    }
    fn bits(map: &HashMap<u16, bool>, start: u16, n: u16) -> Result<Vec<bool>, ExceptionCode> {
        (0..n)
            .map(|i| {
                map.get(&(start + i))
                    .copied()
                    .ok_or(ExceptionCode::IllegalDataAddress)
            })
            .collect()
    }
    Ok(Some(match req {
        Request::ReadHoldingRegisters(a, n) => {
            Response::ReadHoldingRegisters(words(&bank.holding, *a, *n)?)
        }
        Request::ReadInputRegisters(a, n) => {
            Response::ReadInputRegisters(words(&bank.input, *a, *n)?)
        }
        Request::ReadCoils(a, n) => Response::ReadCoils(bits(&bank.coils, *a, *n)?),
        Request::ReadDiscreteInputs(a, n) => {
            Response::ReadDiscreteInputs(bits(&bank.discrete, *a, *n)?)
        }
        _ => return Err(ExceptionCode::IllegalFunction),
    }))
}
