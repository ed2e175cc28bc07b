'use strict';
// Coded errors. The codes are the engine's (src/error.rs); the JavaScript layer only adds the
// argument-type checks that need `typeof`.

/** Every stable error code, with what it means. Kept equal to the engine's list by a test. */
const ERROR_CODES = Object.freeze({
  USP_INVALID_CONFIG: 'The configuration is invalid; the message names the option.',
  USP_UNSUPPORTED_BACKEND: 'The chosen database is not available in this version.',
  USP_INVALID_KEY: 'The key is not a non-empty string of at most maxKeyLength characters without NUL.',
  USP_INVALID_VALUE: 'The value cannot be stored as JSON (undefined, function, symbol, BigInt, circular).',
  USP_VALUE_TOO_LARGE: 'The value is larger than maxValueSize bytes as JSON.',
  USP_INVALID_ARGUMENT: 'An argument other than key or value is wrong (listener options, config given twice).',
  USP_NOT_INITIALIZED: 'A data method was called before init() resolved.',
  USP_CLOSED: 'The streamer is closed.',
  USP_ALREADY_INITIALIZED: 'init() was called with a new config after the streamer started.',
  USP_DB_UNAVAILABLE: 'The database cannot be opened or reached.',
  USP_DB_ERROR: 'The database refused the statement; nothing was written.',
  USP_DB_BUSY: 'The database stayed locked by another process past the busy timeout; retry.',
  USP_OVERLOADED: 'Too many operations are waiting for the store (writeQueueSize); await earlier calls.',
  USP_LISTENER_ERROR: 'A listener threw; delivery to other listeners continued.',
  USP_INTERNAL: 'An engine invariant failed; please report it.',
});

class UspError extends Error {
  /**
   * @param {string} code one of ERROR_CODES
   * @param {string} message what happened and what to do
   * @param {{cause?: unknown}} [options]
   */
  constructor(code, message, options) {
    super(message, options);
    this.name = 'UspError';
    this.code = code;
  }
}

/** Turns an error thrown by the native engine (a plain Error with `code`) into a UspError. */
function fromNative(e) {
  if (e instanceof UspError) return e;
  if (e && typeof e.code === 'string' && e.code.startsWith('USP_')) return new UspError(e.code, e.message);
  return new UspError('USP_INTERNAL', `unexpected engine error: ${e && e.message ? e.message : String(e)}`, { cause: e });
}

/** A short description of a value's type for messages (never the value itself). */
function describe(v) {
  if (v === null) return 'null';
  if (Array.isArray(v)) return 'an array';
  const t = typeof v;
  return t === 'object' ? 'an object' : t;
}

module.exports = { ERROR_CODES, UspError, fromNative, describe };
