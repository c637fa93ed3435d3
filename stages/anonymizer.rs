//! `anonymizer`: placeholder until its stage lands.

fn main() {
    eprintln!("anonymizer: not implemented yet");
    std::process::exit(1);
}
