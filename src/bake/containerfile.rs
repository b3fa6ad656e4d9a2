//! The Containerfile parser: Docker's syntax rules, no I/O.
//!
//! Parsing is syntactic only: lines are joined at the escape character, comments dropped,
//! the instruction keyword, its `--flags` and its arguments separated. Words keep their quotes
//! and `$` references; `expand` (used by the planner) removes the quotes and substitutes
//! variables once the ARG and ENV values of the step are known, as Docker does.

use std::collections::BTreeSet;
use std::fmt;

/// A problem in a Containerfile, with where it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParseError {
    pub file: String,
    pub line: usize,
    pub reason: String,
}

impl fmt::Display for ParseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}: {}", self.file, self.line, self.reason)
    }
}

impl std::error::Error for ParseError {}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Containerfile {
    /// The escape character (`\` unless a `# escape=` directive says otherwise).
    pub escape: char,
    pub instructions: Vec<Instruction>,
}

/// One instruction and the line it starts on; `text` is the joined source line for display.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Instruction {
    pub line: usize,
    pub text: String,
    pub kind: Kind,
}

/// A command as written: exec form (a JSON array) or shell form (the rest of the line).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    Exec(Vec<String>),
    Shell(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Kind {
    From {
        image: String,
        alias: Option<String>,
        platform: Option<String>,
    },
    /// COPY and ADD; `add` marks ADD, which also unpacks local tar archives. `from` is the
    /// raw `--from` word (a stage name or index, or an image); `files` the heredocs among the
    /// sources, which COPY writes as files of their own.
    Copy {
        add: bool,
        sources: Vec<String>,
        dest: String,
        chown: Option<String>,
        chmod: Option<String>,
        from: Option<String>,
        files: Vec<Heredoc>,
    },
    /// The command and its `--mount`/`--network` flags (`mounts` parses them).
    Run(Command, super::mounts::RunFlags),
    /// Raw `key=value` words (quotes kept; the planner expands them).
    Env(Vec<(String, String)>),
    Arg(Vec<(String, Option<String>)>),
    Workdir(String),
    User(String),
    Expose(Vec<String>),
    Label(Vec<(String, String)>),
    Entrypoint(Command),
    Cmd(Command),
    Healthcheck(Option<Healthcheck>),
    Stopsignal(String),
    Volume(Vec<String>),
    Shell(Vec<String>),
    /// ONBUILD: the trigger as written (checked to parse), stored in the image's `OnBuild`.
    Onbuild(String),
}

/// A here-document (`<<EOF` … `EOF`), as BuildKit reads it: `name` is the delimiter without
/// quotes, `expand` is false when the delimiter was quoted, `chomp` is `<<-` (leading tabs
/// are stripped), and `body` holds the lines between, each ending in a newline.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Heredoc {
    pub name: String,
    pub body: String,
    pub expand: bool,
    pub chomp: bool,
}

impl Heredoc {
    /// The body as COPY writes it and a lone `RUN <<EOF` runs it: tabs stripped for `<<-`.
    pub fn content(&self) -> String {
        if !self.chomp {
            return self.body.clone();
        }
        self.body
            .split_inclusive('\n')
            .map(|line| line.trim_start_matches('\t'))
            .collect()
    }
}

/// HEALTHCHECK's flags (durations in nanoseconds) and its command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Healthcheck {
    pub command: Command,
    pub interval: Option<u64>,
    pub timeout: Option<u64>,
    pub start_period: Option<u64>,
    pub retries: Option<u32>,
}

/// Parses a Containerfile; `file` names it in errors.
pub fn parse(file: &str, source: &str) -> Result<Containerfile, ParseError> {
    let err = |line: usize, reason: String| ParseError {
        file: file.to_owned(),
        line,
        reason,
    };
    let lines: Vec<&str> = source.lines().collect();
    let mut escape = '\\';
    let mut index = 0;
    // Parser directives are only recognised in the leading comment lines.
    let mut seen_directives = BTreeSet::new();
    while index < lines.len() {
        let Some((key, value)) = directive(lines[index]) else {
            break;
        };
        if !seen_directives.insert(key.clone()) {
            return Err(err(
                index + 1,
                format!("the {key} directive may appear only once"),
            ));
        }
        if key == "escape" {
            escape = match value.as_str() {
                "\\" => '\\',
                "`" => '`',
                other => {
                    return Err(err(
                        index + 1,
                        format!("invalid escape token {other:?}: it must be \\ or `"),
                    ));
                }
            };
        }
        index += 1;
    }

    let mut instructions = Vec::new();
    while index < lines.len() {
        let start = index;
        let first = lines[index].trim_start();
        index += 1;
        if first.trim().is_empty() || first.starts_with('#') {
            continue;
        }
        let (mut joined, mut more) = trim_continuation(first, escape);
        while more && index < lines.len() {
            let next = lines[index];
            index += 1;
            let trimmed = next.trim_start();
            if trimmed.starts_with('#') || trimmed.trim().is_empty() {
                continue;
            }
            let (part, again) = trim_continuation(next, escape);
            joined.push_str(&part);
            more = again;
        }
        // The bodies of the heredocs the instruction names follow it, in order, each up to
        // the line that is its delimiter; they are read raw (no continuation, no comment).
        let mut heredocs = Vec::new();
        if heredoc_allowed(&joined) {
            for mut heredoc in heredoc_words(&joined, escape) {
                let mut terminated = false;
                while index < lines.len() {
                    let line = lines[index].trim_end_matches('\r');
                    index += 1;
                    let candidate = if heredoc.chomp {
                        line.trim_start_matches('\t')
                    } else {
                        line
                    };
                    if candidate == heredoc.name {
                        terminated = true;
                        break;
                    }
                    heredoc.body.push_str(line);
                    heredoc.body.push('\n');
                }
                if !terminated {
                    return Err(err(
                        start + 1,
                        format!(
                            "unterminated heredoc <<{0}: no line {0} before the end of the file",
                            heredoc.name
                        ),
                    ));
                }
                heredocs.push(heredoc);
            }
        }
        let kind = parse_instruction(&joined, escape, heredocs)
            .map_err(|reason| err(start + 1, reason))?;
        instructions.push(Instruction {
            line: start + 1,
            text: joined.trim().to_owned(),
            kind,
        });
    }
    if let Some(first) = instructions
        .iter()
        .find(|i| !matches!(i.kind, Kind::Arg(_)))
        && !matches!(first.kind, Kind::From { .. })
    {
        return Err(err(
            first.line,
            format!(
                "{} before FROM: only ARG may come before the first FROM",
                keyword(&first.text)
            ),
        ));
    }
    if !instructions
        .iter()
        .any(|i| matches!(i.kind, Kind::From { .. }))
    {
        return Err(err(
            lines.len().max(1),
            "no FROM instruction: a Containerfile must start with FROM".to_owned(),
        ));
    }
    Ok(Containerfile {
        escape,
        instructions,
    })
}

fn keyword(text: &str) -> String {
    text.split_whitespace()
        .next()
        .unwrap_or_default()
        .to_uppercase()
}

/// `# key=value` at the top of the file (Docker knows `escape` and `syntax`).
fn directive(line: &str) -> Option<(String, String)> {
    let rest = line.trim().strip_prefix('#')?;
    let (key, value) = rest.split_once('=')?;
    let key = key.trim().to_lowercase();
    if key.is_empty() || !key.bytes().all(|b| b.is_ascii_alphabetic()) {
        return None;
    }
    matches!(key.as_str(), "escape" | "syntax" | "check").then(|| (key, value.trim().to_owned()))
}

/// Removes a trailing escape character (plus trailing blanks after it); says whether the
/// instruction continues on the next line.
fn trim_continuation(line: &str, escape: char) -> (String, bool) {
    let trimmed = line.trim_end_matches([' ', '\t', '\r']);
    match trimmed.strip_suffix(escape) {
        Some(rest) => (rest.to_owned(), true),
        None => (line.trim_end_matches('\r').to_owned(), false),
    }
}

/// BuildKit reads heredocs after RUN, COPY and ADD only.
fn heredoc_allowed(line: &str) -> bool {
    matches!(keyword(line).as_str(), "RUN" | "COPY" | "ADD")
}

/// The heredocs a line names: the words `<<NAME`, `<<-NAME`, `<<"NAME"`, `<<'NAME'` (an fd
/// number may come first, as `3<<EOF`); `<< EOF` with a blank is no heredoc, as in BuildKit.
fn heredoc_words(line: &str, escape: char) -> Vec<Heredoc> {
    split_words(line, escape)
        .iter()
        .filter_map(|word| parse_heredoc(word, escape))
        .collect()
}

fn parse_heredoc(word: &str, escape: char) -> Option<Heredoc> {
    let rest = word.trim_start_matches(|c: char| c.is_ascii_digit());
    let rest = rest.strip_prefix("<<")?;
    let (chomp, rest) = match rest.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, rest),
    };
    if rest.is_empty() || rest.contains('<') || split_words(rest, escape).len() != 1 {
        return None;
    }
    // Any quote in the delimiter turns expansion off (BuildKit compares the word with and
    // without its quotes); the name is the word with its quotes and escapes removed.
    let quoted = rest.contains(['"', '\'']);
    let mut name = String::new();
    let mut chars = rest.chars();
    while let Some(c) = chars.next() {
        match c {
            '"' | '\'' => {}
            c if c == escape => name.extend(chars.next()),
            c => name.push(c),
        }
    }
    (!name.is_empty()).then_some(Heredoc {
        name,
        body: String::new(),
        expand: !quoted,
        chomp,
    })
}

/// RUN with heredocs as BuildKit turns it into a shell command: a lone `<<EOF` runs its body
/// as the script (a body starting with `#!` is run by that interpreter); otherwise the line
/// and the bodies, each followed by its delimiter, go to the shell, which reads them as
/// here-documents itself (so the delimiter's quoting decides the body's expansion).
fn heredoc_command(text: &str, heredocs: &[Heredoc], escape: char) -> Command {
    if let [single] = heredocs
        && parse_heredoc(text, escape).is_some()
    {
        let content = single.content();
        if let Some(shebang) = content.strip_prefix("#!") {
            // BuildKit writes such a body to a file and runs it; here the interpreter reads
            // it on its standard input, the delimiter quoted so the shell expands nothing.
            let (line, script) = shebang.split_once('\n').unwrap_or((shebang, ""));
            let interpreter: Vec<String> = line.split_whitespace().map(shell_quote).collect();
            return Command::Shell(format!(
                "{} <<'{name}'\n{script}{name}",
                interpreter.join(" "),
                name = single.name
            ));
        }
        return Command::Shell(content);
    }
    let mut full = text.to_owned();
    for heredoc in heredocs {
        full.push('\n');
        full.push_str(&heredoc.body);
        full.push_str(&heredoc.name);
    }
    Command::Shell(full)
}

fn shell_quote(word: &str) -> String {
    format!("'{}'", word.replace('\'', "'\\''"))
}

fn parse_instruction(line: &str, escape: char, heredocs: Vec<Heredoc>) -> Result<Kind, String> {
    let line = line.trim();
    let (word, rest) = match line.find(char::is_whitespace) {
        Some(at) => (&line[..at], line[at..].trim_start()),
        None => (line, ""),
    };
    let name = word.to_uppercase();
    let (flags, rest) = split_flags(rest);
    let allowed: &[&str] = match name.as_str() {
        "FROM" => &["platform"],
        "COPY" => &["chown", "chmod", "from", "link"],
        "ADD" => &["chown", "chmod", "link"],
        "RUN" => &["mount", "network"],
        "HEALTHCHECK" => &[
            "interval",
            "timeout",
            "start-period",
            "start-interval",
            "retries",
        ],
        _ => &[],
    };
    for (flag, _) in &flags {
        if !allowed.contains(&flag.as_str()) {
            return Err(format!("unknown flag --{flag} for {name}"));
        }
    }
    let flag = |key: &str| flags.iter().find(|(k, _)| k == key).map(|(_, v)| v.clone());
    let need_args = |what: &str| -> Result<(), String> {
        if rest.is_empty() {
            Err(format!("{name} requires {what}"))
        } else {
            Ok(())
        }
    };
    Ok(match name.as_str() {
        "FROM" => {
            let words = split_words(rest, escape);
            let (image, alias) = match words.as_slice() {
                [image] => (image.clone(), None),
                [image, as_, alias] if as_.eq_ignore_ascii_case("as") => {
                    if !valid_stage_name(alias) {
                        return Err(format!(
                            "malformed FROM: invalid stage name {alias:?} (letters, digits, . _ - only, starting with a letter)"
                        ));
                    }
                    (image.clone(), Some(alias.to_lowercase()))
                }
                [] => return Err("malformed FROM: it requires an image".to_owned()),
                _ => {
                    return Err(format!(
                        "malformed FROM: expected `FROM image [AS name]`, got {rest:?}"
                    ));
                }
            };
            Kind::From {
                image,
                alias,
                platform: flag("platform"),
            }
        }
        "COPY" | "ADD" => {
            let words = match exec_form(rest) {
                Some(words) => words,
                None => split_words(rest, escape),
            };
            if words.len() < 2 {
                return Err(format!(
                    "{name} requires at least one source and a destination"
                ));
            }
            let (dest, sources) = words.split_last().expect("two words at least");
            for (key, value) in &flags {
                // `--link` (BuildKit's independent layer) is a switch; graven's COPY layers
                // never depend on the layers below, so it changes nothing.
                if value.is_empty() && key != "link" {
                    return Err(format!("{name} --{key} needs a value"));
                }
            }
            if let Some(chmod) = flag("chmod") {
                parse_mode(&chmod)?;
            }
            if parse_heredoc(dest, escape).is_some() {
                return Err(format!("{name} cannot take a heredoc as its destination"));
            }
            // The heredocs among the sources become files; the rest are paths.
            let mut files = heredocs.into_iter();
            let mut inline = Vec::new();
            let mut paths = Vec::new();
            for source in sources {
                if parse_heredoc(source, escape).is_some() {
                    inline.extend(files.next());
                } else {
                    paths.push(source.clone());
                }
            }
            Kind::Copy {
                add: name == "ADD",
                sources: paths,
                dest: dest.clone(),
                chown: flag("chown"),
                chmod: flag("chmod"),
                from: flag("from"),
                files: inline,
            }
        }
        "RUN" => {
            need_args("a command")?;
            let flags = super::mounts::parse_flags(&flags)?;
            if heredocs.is_empty() {
                Kind::Run(command(rest), flags)
            } else {
                Kind::Run(heredoc_command(rest, &heredocs, escape), flags)
            }
        }
        "CMD" => {
            need_args("a command")?;
            Kind::Cmd(command(rest))
        }
        "ENTRYPOINT" => {
            need_args("a command")?;
            Kind::Entrypoint(command(rest))
        }
        "ENV" => Kind::Env(name_values(&name, rest, escape)?),
        "LABEL" => Kind::Label(name_values(&name, rest, escape)?),
        "ARG" => {
            need_args("a name")?;
            let mut args = Vec::new();
            for word in split_words(rest, escape) {
                let (key, value) = match word.split_once('=') {
                    Some((k, v)) => (k.to_owned(), Some(v.to_owned())),
                    None => (word.clone(), None),
                };
                if !valid_var_name(&key) {
                    return Err(format!("ARG name {key:?} is not a valid variable name"));
                }
                args.push((key, value));
            }
            Kind::Arg(args)
        }
        "WORKDIR" => {
            need_args("a path")?;
            Kind::Workdir(rest.to_owned())
        }
        "USER" => {
            let words = split_words(rest, escape);
            match words.as_slice() {
                [user] => Kind::User(user.clone()),
                [] => return Err("USER requires a user".to_owned()),
                _ => return Err(format!("USER takes exactly one user[:group], got {rest:?}")),
            }
        }
        "EXPOSE" => {
            need_args("at least one port")?;
            Kind::Expose(split_words(rest, escape))
        }
        "STOPSIGNAL" => {
            let words = split_words(rest, escape);
            match words.as_slice() {
                [signal] => Kind::Stopsignal(signal.clone()),
                [] => return Err("STOPSIGNAL requires a signal".to_owned()),
                _ => return Err(format!("STOPSIGNAL takes exactly one signal, got {rest:?}")),
            }
        }
        "VOLUME" => {
            need_args("at least one path")?;
            Kind::Volume(exec_form(rest).unwrap_or_else(|| split_words(rest, escape)))
        }
        "SHELL" => match exec_form(rest) {
            Some(words) if !words.is_empty() => Kind::Shell(words),
            _ => return Err("SHELL requires a JSON array, like [\"/bin/sh\", \"-c\"]".to_owned()),
        },
        "HEALTHCHECK" => {
            let (first, command_text) = match rest.find(char::is_whitespace) {
                Some(at) => (&rest[..at], rest[at..].trim_start()),
                None => (rest, ""),
            };
            match first.to_uppercase().as_str() {
                "NONE" => {
                    if !command_text.is_empty() || !flags.is_empty() {
                        return Err("HEALTHCHECK NONE takes no arguments or flags".to_owned());
                    }
                    Kind::Healthcheck(None)
                }
                "CMD" => {
                    if command_text.is_empty() {
                        return Err("HEALTHCHECK CMD requires a command".to_owned());
                    }
                    let duration = |key: &str| -> Result<Option<u64>, String> {
                        flag(key)
                            .map(|v| {
                                parse_duration(&v)
                                    .map_err(|reason| format!("HEALTHCHECK --{key}={v}: {reason}"))
                            })
                            .transpose()
                    };
                    let retries = flag("retries")
                        .map(|v| {
                            v.parse::<u32>().map_err(|_| {
                                format!("HEALTHCHECK --retries={v}: not a non-negative number")
                            })
                        })
                        .transpose()?;
                    duration("start-interval")?;
                    Kind::Healthcheck(Some(Healthcheck {
                        command: command(command_text),
                        interval: duration("interval")?,
                        timeout: duration("timeout")?,
                        start_period: duration("start-period")?,
                        retries,
                    }))
                }
                "" => return Err("HEALTHCHECK requires CMD or NONE".to_owned()),
                other => {
                    return Err(format!("HEALTHCHECK expects CMD or NONE, got {other:?}"));
                }
            }
        }
        "ONBUILD" => {
            need_args("an instruction")?;
            let trigger = keyword(rest);
            if matches!(trigger.as_str(), "ONBUILD" | "FROM" | "MAINTAINER") {
                return Err(format!(
                    "{trigger} is not allowed as an ONBUILD trigger (Docker refuses it too)"
                ));
            }
            // A trigger runs in another bake, but a mistake in it is this file's.
            parse_instruction(rest, escape, Vec::new())
                .map_err(|reason| format!("ONBUILD {reason}"))?;
            Kind::Onbuild(rest.to_owned())
        }
        "MAINTAINER" => {
            return Err("MAINTAINER is not supported by graven: use LABEL".to_owned());
        }
        "" => return Err("empty instruction".to_owned()),
        _ => return Err(format!("unknown instruction {word:?}")),
    })
}

fn valid_stage_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars.next().is_some_and(|c| c.is_ascii_alphabetic())
        && chars.all(|c| c.is_ascii_alphanumeric() || "._-".contains(c))
}

pub(crate) fn valid_var_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// `--name=value` words at the start of the arguments.
fn split_flags(mut rest: &str) -> (Vec<(String, String)>, &str) {
    let mut flags = Vec::new();
    while let Some(after) = rest.strip_prefix("--") {
        let end = after.find(char::is_whitespace).unwrap_or(after.len());
        let word = &after[..end];
        let (key, value) = word.split_once('=').unwrap_or((word, ""));
        flags.push((key.to_lowercase(), value.to_owned()));
        rest = after[end..].trim_start();
    }
    (flags, rest)
}

/// A JSON array of strings, or `None` when the text is not one (then it is shell form).
fn exec_form(text: &str) -> Option<Vec<String>> {
    if !text.starts_with('[') {
        return None;
    }
    serde_json::from_str::<Vec<String>>(text).ok()
}

fn command(text: &str) -> Command {
    match exec_form(text) {
        Some(words) => Command::Exec(words),
        None => Command::Shell(text.to_owned()),
    }
}

/// Splits on blanks outside quotes; quotes and escapes stay in the words for `expand`.
pub(crate) fn split_words(text: &str, escape: char) -> Vec<String> {
    let mut words = Vec::new();
    let mut word = String::new();
    let mut in_word = false;
    let mut quote: Option<char> = None;
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c == escape && quote != Some('\'') {
            word.push(c);
            if let Some(next) = chars.next() {
                word.push(next);
            }
            in_word = true;
            continue;
        }
        match quote {
            Some(q) => {
                word.push(c);
                if c == q {
                    quote = None;
                }
            }
            None if c.is_whitespace() => {
                if in_word {
                    words.push(std::mem::take(&mut word));
                    in_word = false;
                }
            }
            None => {
                if c == '"' || c == '\'' {
                    quote = Some(c);
                }
                word.push(c);
                in_word = true;
            }
        }
    }
    if in_word {
        words.push(word);
    }
    words
}

/// ENV and LABEL: `key=value ...`, or the legacy `key value` form (one pair).
fn name_values(name: &str, rest: &str, escape: char) -> Result<Vec<(String, String)>, String> {
    let words = split_words(rest, escape);
    let Some(first) = words.first() else {
        return Err(format!("{name} requires at least one key=value pair"));
    };
    if !first.contains('=') {
        let value = rest[rest.find(first.as_str()).unwrap_or(0) + first.len()..].trim();
        if value.is_empty() {
            return Err(format!("{name} {first} has no value: use {first}=value"));
        }
        return Ok(vec![(first.clone(), value.to_owned())]);
    }
    words
        .into_iter()
        .map(|word| {
            let (key, value) = word
                .split_once('=')
                .ok_or_else(|| format!("{name} expects key=value, got {word:?}"))?;
            if key.is_empty() {
                return Err(format!("{name} names can not be blank"));
            }
            Ok((key.to_owned(), value.to_owned()))
        })
        .collect()
}

/// `--chmod` values: octal, at most 0o7777.
pub fn parse_mode(text: &str) -> Result<u32, String> {
    u32::from_str_radix(text, 8)
        .ok()
        .filter(|mode| *mode <= 0o7777)
        .ok_or_else(|| format!("--chmod={text}: expected an octal mode like 0755"))
}

/// Go-style durations as HEALTHCHECK takes them (`30s`, `1m30s`, `500ms`), in nanoseconds.
pub fn parse_duration(text: &str) -> Result<u64, String> {
    let mut rest = text;
    let mut total: u64 = 0;
    if rest.is_empty() {
        return Err("empty duration".to_owned());
    }
    while !rest.is_empty() {
        let digits = rest
            .find(|c: char| !c.is_ascii_digit() && c != '.')
            .ok_or_else(|| "a duration needs a unit (ns, us, ms, s, m, h)".to_owned())?;
        if digits == 0 {
            return Err("expected a number".to_owned());
        }
        let number: f64 = rest[..digits]
            .parse()
            .map_err(|_| "expected a number".to_owned())?;
        rest = &rest[digits..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let scale: f64 = match &rest[..unit_len] {
            "ns" => 1.0,
            "us" | "µs" => 1e3,
            "ms" => 1e6,
            "s" => 1e9,
            "m" => 60e9,
            "h" => 3600e9,
            unit => return Err(format!("unknown unit {unit:?}")),
        };
        total = total.saturating_add((number * scale) as u64);
        rest = &rest[unit_len..];
    }
    if total > 0 && total < 1_000_000 {
        return Err("a duration must be at least 1ms".to_owned());
    }
    Ok(total)
}

/// Removes quotes and escapes from a word and substitutes `$VAR`, `${VAR}`,
/// `${VAR:-default}`, `${VAR-default}`, `${VAR:+alt}` and `${VAR+alt}` from `lookup`.
pub fn expand(
    word: &str,
    escape: char,
    lookup: &dyn Fn(&str) -> Option<String>,
) -> Result<String, String> {
    let chars: Vec<char> = word.chars().collect();
    let mut out = String::new();
    let mut i = 0;
    let mut quote: Option<char> = None;
    while i < chars.len() {
        let c = chars[i];
        match quote {
            Some('\'') => {
                if c == '\'' {
                    quote = None;
                } else {
                    out.push(c);
                }
                i += 1;
            }
            Some(_) => {
                if c == '"' {
                    quote = None;
                    i += 1;
                } else if c == escape && i + 1 < chars.len() {
                    let next = chars[i + 1];
                    if next == '"' || next == '$' || next == escape {
                        out.push(next);
                    } else {
                        out.push(c);
                        out.push(next);
                    }
                    i += 2;
                } else if c == '$' {
                    i = variable(&chars, i, escape, lookup, &mut out)?;
                } else {
                    out.push(c);
                    i += 1;
                }
            }
            None => {
                if c == '\'' || c == '"' {
                    quote = Some(c);
                    i += 1;
                } else if c == escape {
                    if let Some(next) = chars.get(i + 1) {
                        out.push(*next);
                    }
                    i += 2;
                } else if c == '$' {
                    i = variable(&chars, i, escape, lookup, &mut out)?;
                } else {
                    out.push(c);
                    i += 1;
                }
            }
        }
    }
    if let Some(q) = quote {
        return Err(format!("unterminated {q} quote in {word:?}"));
    }
    Ok(out)
}

/// A COPY heredoc's body with an unquoted delimiter: `$VAR` and `${VAR…}` substituted, an
/// escaped `$` kept literal, quotes and other characters left as written (BuildKit's lexer
/// in its raw-quotes mode; the body is a file's content, not a word).
pub fn expand_heredoc(
    body: &str,
    escape: char,
    lookup: &dyn Fn(&str) -> Option<String>,
) -> Result<String, String> {
    let chars: Vec<char> = body.chars().collect();
    let mut out = String::new();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        if c == escape && chars.get(i + 1) == Some(&'$') {
            out.push('$');
            i += 2;
        } else if c == '$' {
            i = variable(&chars, i, escape, lookup, &mut out)?;
        } else {
            out.push(c);
            i += 1;
        }
    }
    Ok(out)
}

/// Parses an ONBUILD trigger (as an image's `OnBuild` list holds it) into the instruction it
/// names.
pub fn parse_trigger(text: &str, escape: char) -> Result<Kind, String> {
    if matches!(keyword(text).as_str(), "ONBUILD" | "FROM" | "MAINTAINER") {
        return Err(format!(
            "{} is not allowed as an ONBUILD trigger",
            keyword(text)
        ));
    }
    parse_instruction(text, escape, Vec::new())
}

/// Expands the reference starting at `chars[start] == '$'`; returns the index after it.
fn variable(
    chars: &[char],
    start: usize,
    escape: char,
    lookup: &dyn Fn(&str) -> Option<String>,
    out: &mut String,
) -> Result<usize, String> {
    let mut i = start + 1;
    if chars.get(i) == Some(&'{') {
        i += 1;
        let name_start = i;
        while i < chars.len() && (chars[i].is_ascii_alphanumeric() || chars[i] == '_') {
            i += 1;
        }
        let name: String = chars[name_start..i].iter().collect();
        if name.is_empty() {
            return Err("bad substitution: empty variable name in ${}".to_owned());
        }
        let value = lookup(&name);
        match chars.get(i) {
            Some('}') => {
                out.push_str(&value.unwrap_or_default());
                Ok(i + 1)
            }
            Some(':') | Some('-') | Some('+') => {
                let colon = chars[i] == ':';
                if colon {
                    i += 1;
                }
                let op = *chars
                    .get(i)
                    .ok_or_else(|| format!("bad substitution in ${{{name}"))?;
                if op != '-' && op != '+' {
                    return Err(format!(
                        "unsupported modifier {op:?} in ${{{name}...}}: use :- or :+"
                    ));
                }
                i += 1;
                let word_start = i;
                let mut depth = 0;
                while i < chars.len() {
                    match chars[i] {
                        '{' => depth += 1,
                        '}' if depth == 0 => break,
                        '}' => depth -= 1,
                        c if c == escape => i += 1,
                        _ => {}
                    }
                    i += 1;
                }
                if i >= chars.len() {
                    return Err(format!("missing }} in ${{{name}..."));
                }
                let inner: String = chars[word_start..i].iter().collect();
                let inner = expand(&inner, escape, lookup)?;
                let set = match &value {
                    Some(v) => !(colon && v.is_empty()),
                    None => false,
                };
                let chosen = match (op, set) {
                    ('-', true) => value.unwrap_or_default(),
                    ('-', false) => inner,
                    ('+', true) => inner,
                    _ => String::new(),
                };
                out.push_str(&chosen);
                Ok(i + 1)
            }
            _ => Err(format!("missing }} in ${{{name}")),
        }
    } else {
        let name_start = i;
        while i < chars.len() && (chars[i].is_ascii_alphanumeric() || chars[i] == '_') {
            i += 1;
        }
        if i == name_start {
            out.push('$');
            return Ok(i);
        }
        let name: String = chars[name_start..i].iter().collect();
        out.push_str(&lookup(&name).unwrap_or_default());
        Ok(i)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use expect_test::{Expect, expect};

    fn check(source: &str, expected: Expect) {
        let actual = match parse("Containerfile", source) {
            Ok(file) => file
                .instructions
                .iter()
                .map(|i| format!("{}: {:?}", i.line, i.kind))
                .collect::<Vec<_>>()
                .join("\n"),
            Err(e) => format!("error: {e}"),
        };
        expected.assert_eq(&actual);
    }

    #[test]
    fn the_example() {
        check(
            include_str!("../../examples/hello/Containerfile"),
            expect![[r#"
                2: From { image: "scratch", alias: None, platform: None }
                3: Copy { add: false, sources: ["dist/hello"], dest: "/hello", chown: None, chmod: None, from: None, files: [] }
                4: Env([("PORT", "8080")])
                5: Expose(["8080"])
                6: User("65534:65534")
                7: Stopsignal("SIGTERM")
                8: Entrypoint(Exec(["/hello"]))"#]],
        );
    }

    #[test]
    fn continuations_and_comments() {
        check(
            "FROM scratch\nRUN echo a \\\n  # a comment inside\n\n    b \\   \n  c\nCMD x",
            expect![[r#"
                1: From { image: "scratch", alias: None, platform: None }
                2: Run(Shell("echo a     b   c"), RunFlags { mounts: [], no_network: false })
                7: Cmd(Shell("x"))"#]],
        );
        check(
            "# escape=`\nFROM scratch\nRUN dir c:\\ `\n  more",
            expect![[r#"
                2: From { image: "scratch", alias: None, platform: None }
                3: Run(Shell("dir c:\\   more"), RunFlags { mounts: [], no_network: false })"#]],
        );
        // A directive after the first comment is just a comment.
        check(
            "# hello\n# escape=`\nFROM scratch\nRUN a \\\n b",
            expect![[r#"
                3: From { image: "scratch", alias: None, platform: None }
                4: Run(Shell("a  b"), RunFlags { mounts: [], no_network: false })"#]],
        );
    }

    #[test]
    fn forms_and_flags() {
        check(
            r#"ARG BASE=scratch
from ${BASE} AS build
COPY --chown=1:2 --chmod=0750 a "b c" /dst/
ADD ["x y", "/z"]
ENV A=1 B="two words" C=3
ENV LEGACY value with spaces
LABEL "org.x"="y" z=w
ENTRYPOINT ["/bin/app", "--flag"]
CMD not json [
HEALTHCHECK --interval=30s --timeout=1m30s --start-period=500ms --retries=3 CMD ["/hello", "check"]
HEALTHCHECK NONE
VOLUME ["/data"]
SHELL ["/bin/ash", "-c"]
WORKDIR /app dir
STOPSIGNAL 15"#,
            expect![[r#"
                1: Arg([("BASE", Some("scratch"))])
                2: From { image: "${BASE}", alias: Some("build"), platform: None }
                3: Copy { add: false, sources: ["a", "\"b c\""], dest: "/dst/", chown: Some("1:2"), chmod: Some("0750"), from: None, files: [] }
                4: Copy { add: true, sources: ["x y"], dest: "/z", chown: None, chmod: None, from: None, files: [] }
                5: Env([("A", "1"), ("B", "\"two words\""), ("C", "3")])
                6: Env([("LEGACY", "value with spaces")])
                7: Label([("\"org.x\"", "\"y\""), ("z", "w")])
                8: Entrypoint(Exec(["/bin/app", "--flag"]))
                9: Cmd(Shell("not json ["))
                10: Healthcheck(Some(Healthcheck { command: Exec(["/hello", "check"]), interval: Some(30000000000), timeout: Some(90000000000), start_period: Some(500000000), retries: Some(3) }))
                11: Healthcheck(None)
                12: Volume(["/data"])
                13: Shell(["/bin/ash", "-c"])
                14: Workdir("/app dir")
                15: Stopsignal("15")"#]],
        );
    }

    #[test]
    fn bad_input() {
        let cases = [
            (
                "FROM scratch\nFROBNICATE x",
                "Containerfile:2: unknown instruction \"FROBNICATE\"",
            ),
            (
                "FROM",
                "Containerfile:1: malformed FROM: it requires an image",
            ),
            (
                "FROM a b",
                "Containerfile:1: malformed FROM: expected `FROM image [AS name]`, got \"a b\"",
            ),
            (
                "FROM a AS",
                "Containerfile:1: malformed FROM: expected `FROM image [AS name]`, got \"a AS\"",
            ),
            (
                "FROM a AS 1x",
                "Containerfile:1: malformed FROM: invalid stage name \"1x\" (letters, digits, . _ - only, starting with a letter)",
            ),
            (
                "COPY a /b",
                "Containerfile:1: COPY before FROM: only ARG may come before the first FROM",
            ),
            (
                "# only a comment",
                "Containerfile:1: no FROM instruction: a Containerfile must start with FROM",
            ),
            (
                "FROM scratch\nCOPY onlyone",
                "Containerfile:2: COPY requires at least one source and a destination",
            ),
            (
                "FROM scratch\nCOPY --from= a b",
                "Containerfile:2: COPY --from needs a value",
            ),
            (
                "FROM scratch\nADD --from=x a b",
                "Containerfile:2: unknown flag --from for ADD",
            ),
            (
                "FROM scratch\nCOPY <<EOF <<EOF2\nx\nEOF\nEOF2",
                "Containerfile:2: COPY cannot take a heredoc as its destination",
            ),
            (
                "FROM scratch\nRUN <<EOF\necho never ends\n",
                "Containerfile:2: unterminated heredoc <<EOF: no line EOF before the end of the file",
            ),
            (
                "FROM scratch\nRUN cat <<A <<-B\na\nA\n",
                "Containerfile:2: unterminated heredoc <<B: no line B before the end of the file",
            ),
            (
                "FROM scratch\nONBUILD ONBUILD RUN x",
                "Containerfile:2: ONBUILD is not allowed as an ONBUILD trigger (Docker refuses it too)",
            ),
            (
                "FROM scratch\nONBUILD from scratch",
                "Containerfile:2: FROM is not allowed as an ONBUILD trigger (Docker refuses it too)",
            ),
            (
                "FROM scratch\nONBUILD MAINTAINER me",
                "Containerfile:2: MAINTAINER is not allowed as an ONBUILD trigger (Docker refuses it too)",
            ),
            (
                "FROM scratch\nONBUILD",
                "Containerfile:2: ONBUILD requires an instruction",
            ),
            (
                "FROM scratch\nONBUILD FROBNICATE x",
                "Containerfile:2: ONBUILD unknown instruction \"FROBNICATE\"",
            ),
            (
                "FROM scratch\nCOPY --own=1 a b",
                "Containerfile:2: unknown flag --own for COPY",
            ),
            (
                "FROM scratch\nCOPY --chmod=999 a b",
                "Containerfile:2: --chmod=999: expected an octal mode like 0755",
            ),
            (
                "FROM scratch\nRUN",
                "Containerfile:2: RUN requires a command",
            ),
            (
                "FROM scratch\nRUN --mount=type=cache x",
                "Containerfile:2: --mount=type=cache: a cache mount needs a target",
            ),
            (
                "FROM scratch\nENV",
                "Containerfile:2: ENV requires at least one key=value pair",
            ),
            (
                "FROM scratch\nENV A=1 B",
                "Containerfile:2: ENV expects key=value, got \"B\"",
            ),
            (
                "FROM scratch\nENV =1",
                "Containerfile:2: ENV names can not be blank",
            ),
            (
                "FROM scratch\nENV A",
                "Containerfile:2: ENV A has no value: use A=value",
            ),
            (
                "FROM scratch\nARG 1A",
                "Containerfile:2: ARG name \"1A\" is not a valid variable name",
            ),
            (
                "FROM scratch\nUSER a b",
                "Containerfile:2: USER takes exactly one user[:group], got \"a b\"",
            ),
            (
                "FROM scratch\nSTOPSIGNAL",
                "Containerfile:2: STOPSIGNAL requires a signal",
            ),
            (
                "FROM scratch\nHEALTHCHECK",
                "Containerfile:2: HEALTHCHECK requires CMD or NONE",
            ),
            (
                "FROM scratch\nHEALTHCHECK RUN x",
                "Containerfile:2: HEALTHCHECK expects CMD or NONE, got \"RUN\"",
            ),
            (
                "FROM scratch\nHEALTHCHECK --interval=5 CMD x",
                "Containerfile:2: HEALTHCHECK --interval=5: a duration needs a unit (ns, us, ms, s, m, h)",
            ),
            (
                "FROM scratch\nHEALTHCHECK --retries=-1 CMD x",
                "Containerfile:2: HEALTHCHECK --retries=-1: not a non-negative number",
            ),
            (
                "FROM scratch\nHEALTHCHECK --interval=1s NONE",
                "Containerfile:2: HEALTHCHECK NONE takes no arguments or flags",
            ),
            (
                "FROM scratch\nSHELL /bin/sh",
                "Containerfile:2: SHELL requires a JSON array, like [\"/bin/sh\", \"-c\"]",
            ),
            (
                "FROM scratch\nMAINTAINER me",
                "Containerfile:2: MAINTAINER is not supported by graven: use LABEL",
            ),
            (
                "# escape=x\nFROM scratch",
                "Containerfile:1: invalid escape token \"x\": it must be \\ or `",
            ),
            (
                "FROM scratch\nCMD --x \\\n\n  y",
                "Containerfile:2: unknown flag --x for CMD",
            ),
        ];
        let mut failures = Vec::new();
        for (source, expected) in cases {
            match parse("Containerfile", source) {
                Ok(parsed) => failures.push(format!("{source:?} parsed: {parsed:?}")),
                Err(e) if e.to_string() == expected => {}
                Err(e) => failures.push(format!("{source:?}\n  got:  {e}\n  want: {expected}")),
            }
        }
        assert!(failures.is_empty(), "{}", failures.join("\n"));
    }

    /// Heredocs as BuildKit reads them: which words open one, how the delimiter's quoting
    /// and `<<-` come out, and what RUN hands the shell.
    #[test]
    fn heredocs() {
        check(
            "# syntax=docker/dockerfile:1\n# check=skip=all\nFROM scratch\nRUN <<EOF\necho $HOME\n\tsh -c 'x'\nEOF\nRUN <<-EOF\n\techo tabs\n\tEOF\nRUN python3 <<'EOF' > /out\nprint(\"$x\")\nEOF\nRUN cat <<A && cat <<\"B\"\na $x\nA\nb $x\nB\nRUN <<EOF\n#!/usr/bin/env python3\nprint(1)\nEOF\nRUN echo '<<NOT' << NOT2 \"<<NOT3\"\nCMD done",
            expect![[r#"
                3: From { image: "scratch", alias: None, platform: None }
                4: Run(Shell("echo $HOME\n\tsh -c 'x'\n"), RunFlags { mounts: [], no_network: false })
                8: Run(Shell("echo tabs\n"), RunFlags { mounts: [], no_network: false })
                11: Run(Shell("python3 <<'EOF' > /out\nprint(\"$x\")\nEOF"), RunFlags { mounts: [], no_network: false })
                14: Run(Shell("cat <<A && cat <<\"B\"\na $x\nA\nb $x\nB"), RunFlags { mounts: [], no_network: false })
                19: Run(Shell("'/usr/bin/env' 'python3' <<'EOF'\nprint(1)\nEOF"), RunFlags { mounts: [], no_network: false })
                23: Run(Shell("echo '<<NOT' << NOT2 \"<<NOT3\""), RunFlags { mounts: [], no_network: false })
                24: Cmd(Shell("done"))"#]],
        );
        check(
            "FROM scratch\nCOPY --chmod=0600 <<a.txt <<'b.txt' /dir/\n$A\na.txt\n$B\nb.txt\nCOPY <<-EOF ctx /f\n\tx\nEOF\nADD --link <<EOF /g\nEOF",
            expect![[r#"
                1: From { image: "scratch", alias: None, platform: None }
                2: Copy { add: false, sources: [], dest: "/dir/", chown: None, chmod: Some("0600"), from: None, files: [Heredoc { name: "a.txt", body: "$A\n", expand: true, chomp: false }, Heredoc { name: "b.txt", body: "$B\n", expand: false, chomp: false }] }
                7: Copy { add: false, sources: ["ctx"], dest: "/f", chown: None, chmod: None, from: None, files: [Heredoc { name: "EOF", body: "\tx\n", expand: true, chomp: true }] }
                10: Copy { add: true, sources: [], dest: "/g", chown: None, chmod: None, from: None, files: [Heredoc { name: "EOF", body: "", expand: true, chomp: false }] }"#]],
        );
    }

    #[test]
    fn heredoc_delimiters() {
        for (word, expected) in [
            ("<<EOF", Some(("EOF", true, false))),
            ("<<-EOF", Some(("EOF", true, true))),
            ("<<'EOF'", Some(("EOF", false, false))),
            ("<<-\"EOF\"", Some(("EOF", false, true))),
            ("<<E\"O\"F", Some(("EOF", false, false))),
            ("3<<EOF", Some(("EOF", true, false))),
            ("<<", None),
            ("<<<EOF", None),
            ("\"<<EOF\"", None),
            ("x<<EOF", None),
        ] {
            let actual = parse_heredoc(word, '\\');
            assert_eq!(
                actual
                    .as_ref()
                    .map(|h| (h.name.as_str(), h.expand, h.chomp)),
                expected,
                "{word}"
            );
        }
    }

    #[test]
    fn heredoc_bodies_expand_variables_and_keep_quotes() {
        let lookup = |name: &str| (name == "A").then(|| "alpha".to_owned());
        assert_eq!(
            expand_heredoc("'$A' \"${A}\" \\$A ${B:-b} $\n", '\\', &lookup).as_deref(),
            Ok("'alpha' \"alpha\" $A b $\n")
        );
    }

    #[test]
    fn onbuild_keeps_its_trigger() {
        check(
            "FROM scratch\nonbuild COPY --chown=1 . /app\nONBUILD RUN make",
            expect![[r#"
                1: From { image: "scratch", alias: None, platform: None }
                2: Onbuild("COPY --chown=1 . /app")
                3: Onbuild("RUN make")"#]],
        );
    }

    fn check_expand(word: &str, expected: Result<&str, &str>) {
        let lookup = |name: &str| match name {
            "A" => Some("alpha".to_owned()),
            "EMPTY" => Some(String::new()),
            _ => None,
        };
        let actual = expand(word, '\\', &lookup);
        assert_eq!(
            actual.as_deref().map_err(String::as_str),
            expected,
            "expanding {word:?}"
        );
    }

    #[test]
    fn expansion() {
        check_expand("$A", Ok("alpha"));
        check_expand("${A}x", Ok("alphax"));
        check_expand("$A.b", Ok("alpha.b"));
        check_expand("$NOPE-", Ok("-"));
        check_expand("${NOPE:-dflt}", Ok("dflt"));
        check_expand("${EMPTY:-dflt}", Ok("dflt"));
        check_expand("${EMPTY-dflt}", Ok(""));
        check_expand("${A:-dflt}", Ok("alpha"));
        check_expand("${A:+set}", Ok("set"));
        check_expand("${NOPE:+set}", Ok(""));
        check_expand("${NOPE:-$A/x}", Ok("alpha/x"));
        check_expand("'$A'", Ok("$A"));
        check_expand("\"$A b\"", Ok("alpha b"));
        check_expand("\\$A", Ok("$A"));
        check_expand("\"a\\\"b\"", Ok("a\"b"));
        check_expand("$", Ok("$"));
        check_expand("${A", Err("missing } in ${A"));
        check_expand("${A?x}", Err("missing } in ${A"));
        check_expand(
            "${A:=x}",
            Err("unsupported modifier '=' in ${A...}: use :- or :+"),
        );
        check_expand("${}", Err("bad substitution: empty variable name in ${}"));
        check_expand("\"open", Err("unterminated \" quote in \"\\\"open\""));
    }

    /// Noise made of Containerfile tokens never panics the parser or the expander.
    #[test]
    fn noise_never_panics() {
        const TOKENS: &[&str] = &[
            "FROM ",
            "COPY ",
            "RUN ",
            "ENV ",
            "ARG ",
            "HEALTHCHECK ",
            "CMD ",
            "LABEL ",
            "ADD ",
            "--chown=",
            "--interval=",
            "--retries=",
            "--",
            "=",
            "\\",
            "\n",
            "\\\n",
            "#",
            "# escape=`\n",
            "`",
            "\"",
            "'",
            "[",
            "]",
            "\"a\"",
            ",",
            "$",
            "${",
            "}",
            ":-",
            ":+",
            "x",
            " ",
            "\t",
            "µs",
            "9999999999999999999h",
            "1.5s",
            "NONE",
            "AS ",
            "scratch",
            "<<EOF",
            "<<-'A'",
            "EOF\n",
            "\tA\n",
            "ONBUILD ",
            "--from=",
            "é",
            "\r",
        ];
        let mut rng = fastrand::Rng::with_seed(7);
        for _ in 0..20_000 {
            let text: String = (0..rng.usize(1..30))
                .map(|_| TOKENS[rng.usize(..TOKENS.len())])
                .collect();
            let _ = parse("noise", &text);
            let _ = expand(&text, '\\', &|_| Some("v".to_owned()));
            let _ = expand(&text, '`', &|_| None);
            let _ = parse_duration(&text);
        }
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("1m30s"), Ok(90_000_000_000));
        assert_eq!(parse_duration("0s"), Ok(0));
        assert_eq!(parse_duration("1.5s"), Ok(1_500_000_000));
        assert!(parse_duration("10").is_err());
        assert!(parse_duration("5d").is_err());
        assert!(parse_duration("10us").is_err());
    }
}
