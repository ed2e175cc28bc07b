'use strict';
// JavaScript lint: the recommended rules, Node globals, and browser globals for the browser client.
const js = require('@eslint/js');
const globals = require('globals');

module.exports = [
  { ignores: ['native/**', 'target/**', 'node_modules/**'] },
  js.configs.recommended,
  {
    files: ['**/*.js'],
    languageOptions: { ecmaVersion: 2023, sourceType: 'commonjs', globals: { ...globals.node } },
    rules: { 'no-unused-vars': ['error', { argsIgnorePattern: '^_', caughtErrors: 'none' }] },
  },
  {
    files: ['**/*.mjs'],
    languageOptions: { ecmaVersion: 2023, sourceType: 'module', globals: { ...globals.node } },
  },
  {
    files: ['client/**/*.mjs'],
    languageOptions: { globals: { ...globals.browser } },
  },
  {
    files: ['__test__/**/*.js'],
    languageOptions: { globals: { ...globals.jest } },
  },
];
