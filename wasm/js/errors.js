// Errors of the JS API: every failure is an `Error` with a `message` and a string `code`.
// Errors thrown by the engine (wasm `Core`) already have a code ("NotFound", "Deleted",
// "InvalidJson", "BadPath", ...) and are passed on unchanged; the ones raised here use the
// codes below.

/** An `Error` with a `code`; extra fields (e.g. `reason`, `doc`) are copied onto it. */
export function weftError(code, message, extra) {
  const error = new Error(message);
  error.name = "WeftError";
  error.code = code;
  if (extra) Object.assign(error, extra);
  return error;
}

/** Makes sure what was thrown is an `Error` with a `code` (the engine's own are kept as is). */
export function asWeftError(thrown, fallbackCode = "Internal") {
  if (thrown instanceof Error) {
    if (typeof thrown.code !== "string") thrown.code = fallbackCode;
    return thrown;
  }
  return weftError(fallbackCode, String(thrown));
}
