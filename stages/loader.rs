//! `loader`: placeholder until its stage lands.

fn main() {
    eprintln!("loader: not implemented yet");
    std::process::exit(1);
}
