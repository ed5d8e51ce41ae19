'use strict';
// Shared by the ali-ons driver scripts of tests/e2e/remoting.rs: options from argv[2] (JSON), one
// JSON object per stdout line, SDK logs and errors on stderr.

const silent = {
  info() {},
  debug() {},
  warn(...args) { console.error('[warn]', ...args); },
  error(...args) { console.error('[error]', ...args); },
};

function options() {
  const opts = JSON.parse(process.argv[2] || '{}');
  const base = {
    nameSrv: opts.nameSrv,
    // ali-ons asserts an HTTP client for its ONS address server; with nameSrv set it is never used.
    httpclient: { request() { throw new Error('nameSrv is set: no address server lookup'); } },
    logger: silent,
  };
  if (opts.accessKeyId) {
    base.accessKeyId = opts.accessKeyId;
    base.accessKeySecret = opts.accessKeySecret;
  }
  return { opts, base };
}

function emit(obj) {
  process.stdout.write(JSON.stringify(obj) + '\n');
}

function fail(err) {
  emit({ event: 'error', message: String(err && err.message || err), code: err && err.code });
  process.exit(1);
}

module.exports = { options, emit, fail };
