//! `wharf`: parse the command line, then serve or run a client command.

fn main() {
    println!("wharf");
}
