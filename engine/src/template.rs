//! The chat template: the Jinja template the model was trained with (`tokenizer.chat_template`
//! in the GGUF), rendered with minijinja under the settings Hugging Face transformers uses
//! (`trim_blocks`, `lstrip_blocks`, Python string methods), and a fuel limit.

use crate::gguf::Gguf;
use crate::{Error, Result};
use minijinja::{Environment, ErrorKind, Value};
use serde::{Deserialize, Serialize};

/// Largest template accepted from a model file.
const MAX_TEMPLATE_BYTES: usize = 64 << 10;
/// Instruction budget for one rendering; a template that loops forever runs out of it.
const FUEL: u64 = 5_000_000;

/// ChatML, which llama.cpp also falls back to when a model has no template.
const CHATML: &str = "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

/// One chat message.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Message {
    pub role: String,
    pub content: String,
}

impl Message {
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        Message {
            role: role.into(),
            content: content.into(),
        }
    }
}

/// A compiled chat template.
pub struct ChatTemplate {
    env: Environment<'static>,
    bos: String,
    eos: String,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate").finish_non_exhaustive()
    }
}

impl ChatTemplate {
    /// The model's own template, or ChatML if it has none.
    pub fn from_gguf(g: &Gguf) -> Result<Self> {
        let source = g.opt_str("tokenizer.chat_template").unwrap_or(CHATML);
        let tokens = g.array("tokenizer.ggml.tokens")?;
        let token = |key: &str| -> String {
            g.opt_u64(key)
                .ok()
                .flatten()
                .and_then(|i| tokens.get(usize::try_from(i).ok()?))
                .and_then(|v| v.to_string().ok())
                .cloned()
                .unwrap_or_default()
        };
        Self::new(
            source,
            token("tokenizer.ggml.bos_token_id"),
            token("tokenizer.ggml.eos_token_id"),
        )
    }

    pub fn new(source: &str, bos: String, eos: String) -> Result<Self> {
        if source.len() > MAX_TEMPLATE_BYTES {
            return Err(Error::Format(format!(
                "the chat template is {} bytes; at most {MAX_TEMPLATE_BYTES} are accepted",
                source.len()
            )));
        }
        let mut env = Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_fuel(Some(FUEL));
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function(
            "raise_exception",
            |msg: String| -> std::result::Result<Value, minijinja::Error> {
                Err(minijinja::Error::new(ErrorKind::InvalidOperation, msg))
            },
        );
        env.add_template_owned("chat", source.to_string())
            .map_err(|e| Error::Format(format!("the chat template does not compile: {e}")))?;
        Ok(ChatTemplate { env, bos, eos })
    }

    /// The prompt text for `messages`, ending where the assistant's answer starts.
    pub fn render(&self, messages: &[Message]) -> Result<String> {
        let tmpl = self
            .env
            .get_template("chat")
            .map_err(|e| Error::Format(format!("chat template: {e}")))?;
        tmpl.render(minijinja::context! {
            messages => messages,
            add_generation_prompt => true,
            bos_token => &self.bos,
            eos_token => &self.eos,
        })
        .map_err(|e| Error::InvalidRequest(format!("the chat template refused the messages: {e}")))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn chatml_renders() {
        let t = ChatTemplate::new(CHATML, String::new(), String::new()).unwrap();
        let s = t.render(&[Message::new("user", "hi")]).unwrap();
        assert_eq!(s, "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n");
    }

    #[test]
    fn raise_exception_and_runaway_templates_are_errors() {
        let t = ChatTemplate::new(
            "{{ raise_exception('no system role') }}",
            String::new(),
            String::new(),
        )
        .unwrap();
        assert!(t
            .render(&[])
            .unwrap_err()
            .to_string()
            .contains("no system role"));
        let t = ChatTemplate::new(
            "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
            String::new(),
            String::new(),
        )
        .unwrap();
        assert!(t.render(&[]).is_err());
    }

    #[test]
    fn python_string_methods_work() {
        let t = ChatTemplate::new(
            "{{ messages[0].content.strip().upper() }}",
            String::new(),
            String::new(),
        )
        .unwrap();
        assert_eq!(t.render(&[Message::new("user", "  x ")]).unwrap(), "X");
    }
}
