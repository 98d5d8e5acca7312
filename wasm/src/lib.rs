//! weft for JavaScript. For now this crate only proves that the engine compiles for
//! `wasm32-unknown-unknown` without IO; the JS API arrives with its own issue.
use wasm_bindgen::prelude::*;

/// The weft version this package was built from.
#[wasm_bindgen]
pub fn version() -> String {
    env!("CARGO_PKG_VERSION").to_owned()
}

/// Runs the engine once (create a document, no storage) to prove it links on this target.
#[wasm_bindgen(js_name = engineSmoke)]
pub fn engine_smoke(seed: u64) -> Result<String, JsError> {
    use weft::engine::{Command, CommandId, Engine, EngineConfig, Input, Output};
    let mut engine = Engine::new(EngineConfig::new(
        weft::ReplicaId::from_bytes([1; 16]),
        seed,
        1,
    ));
    let body = weft::json::parse_object(r#"{"hello":"wasm"}"#)
        .map_err(|e| JsError::new(&e.to_string()))?;
    let fx = engine.handle(
        0,
        Input::Command(
            CommandId(1),
            Command::Create {
                collection: "smoke".into(),
                body,
            },
        ),
    );
    match fx.completed.into_iter().next() {
        Some((_, Ok(Output::Created { id, .. }))) => Ok(id.to_string()),
        Some((_, Err(e))) => Err(JsError::new(&e.to_string())),
        _ => Err(JsError::new("engine did not complete the command")),
    }
}
