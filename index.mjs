// Public entry point (ES modules).
import cjs from './index.js';

export const { UltimateStreamer, UspError, ERROR_CODES } = cjs;
export default cjs;
