'use strict';
// Public entry point (CommonJS). `native/` holds the generated Node-API loader and binary.
const { UltimateStreamer } = require('./lib/streamer');
const { UspError, ERROR_CODES } = require('./lib/errors');

module.exports = UltimateStreamer;
module.exports.UltimateStreamer = UltimateStreamer;
module.exports.default = UltimateStreamer;
module.exports.UspError = UspError;
module.exports.ERROR_CODES = ERROR_CODES;
