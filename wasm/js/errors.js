// Errors of the JS API: everything the package throws or rejects with is a `WeftError` (an
// `Error` with a string `code`). Errors thrown by the engine (the wasm `Core`: JS `Error`s with
// a code such as "NotFound", "Deleted", "InvalidJson", "BadPath") become `WeftError`s where
// they leave the package (`asWeftError`), keeping their code and message.

/** An `Error` with a string `code` naming what went wrong; some carry extra fields. */
export class WeftError extends Error {
  /**
   * `options.cause` becomes the standard `cause`; any other field of `options` (e.g.
   * `closeCode`, `reason`, `rejectCode`, `status`, `doc`) is copied onto the error.
   */
  constructor(code, message, options) {
    const { cause, ...extra } = options ?? {};
    super(message, cause !== undefined ? { cause } : undefined);
    this.code = String(code);
    Object.assign(this, extra);
  }
}
// On the prototype, like the built-in errors' names: not an own (enumerable) field.
WeftError.prototype.name = "WeftError";

/** A `WeftError` (kept as a function: most of the package builds its errors with it). */
export function weftError(code, message, options) {
  return new WeftError(code, message, options);
}

/**
 * What was thrown, as a `WeftError`: a `WeftError` as is; an `Error` with a string `code` (the
 * engine's) as a `WeftError` with that code, message and extra fields; anything else as a
 * `WeftError` with `fallbackCode`, the original as its `cause`.
 */
export function asWeftError(thrown, fallbackCode = "Internal") {
  if (thrown instanceof WeftError) return thrown;
  if (thrown instanceof Error && typeof thrown.code === "string") {
    // Own enumerable fields: the code and whatever else the engine attached.
    const { code: _code, ...extra } = { ...thrown };
    return new WeftError(thrown.code, thrown.message, extra);
  }
  const message = thrown instanceof Error ? thrown.message : String(thrown);
  return new WeftError(fallbackCode, message, { cause: thrown });
}

/** `signal` if it is an AbortSignal (or absent); otherwise an "InvalidArgument" error. */
export function checkSignal(signal) {
  if (signal == null) return undefined;
  if (typeof signal.aborted !== "boolean" || typeof signal.addEventListener !== "function") {
    throw new WeftError("InvalidArgument", "`signal` must be an AbortSignal");
  }
  return signal;
}

/** The error an aborted operation rejects with: code "Aborted", the signal's reason as cause. */
export function abortError(signal, what) {
  return new WeftError("Aborted", `${what} was aborted`, { cause: signal.reason });
}
